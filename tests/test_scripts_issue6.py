"""Tests of scripts/bench.py and scripts/reproduce.py: the aggregation maths by hand, and both scripts' quick modes.

Hand computations used below (two seeds A and B, evaluated at different steps):

    A: 100 -> 0.0, 200 -> 0.5, 300 -> 1.0         B: 100 -> 0.2, 250 -> 0.6, 300 -> 0.8
    grid = union within [max first, min last] = [100, 200, 250, 300]
    A on grid = [0.0, 0.5, 0.75, 1.0]             B on grid = [0.2, 0.2 + 0.4 * 100/150, 0.6, 0.8]
    mean = [0.1, 0.48333.., 0.675, 0.9]
    two seeds: sd / sqrt(2) = |a - b| / 2 and t_{0.975, 1} = 12.7062047, so the half-width at step 100 is 1.27062047
    50%: between 200 (0.48333) and 250 (0.675): 200 + (0.5 - 0.48333) / (0.675 - 0.48333) * 50 = 204.347826..
    80%: between 250 (0.675) and 300 (0.9): 250 + 0.125 / 0.225 * 50 = 277.777..
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_issue6_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


rep = _load("reproduce")


def _write_metrics(path: Path, records: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _curve(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(steps, dtype=np.float64), np.array(values, dtype=np.float64)


A = _curve([100, 200, 300], [0.0, 0.5, 1.0])
B = _curve([100, 250, 300], [0.2, 0.6, 0.8])


# --------------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062047362), (2, 4.3026527297), (4, 2.7764451052), (9, 2.2621571628), (30, 2.0422724563)],
)
def test_t_quantile_matches_the_table(df: int, expected: float) -> None:
    assert rep.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)


def test_t_quantile_is_symmetric_and_median_zero() -> None:
    assert rep.t_quantile(0.025, 3) == pytest.approx(-rep.t_quantile(0.975, 3), abs=1e-10)
    assert rep.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="0 < q < 1"):
        rep.t_quantile(1.0, 3)


def test_mean_ci_three_seeds_by_hand() -> None:
    # values 0.2, 0.4, 0.6: mean 0.4, sd 0.2, half = t_{0.975,2} * 0.2 / sqrt(3) = 4.30265273 * 0.11547005 = 0.4968275
    mean, lo, hi = rep.mean_ci(np.array([[0.2], [0.4], [0.6]]))
    assert mean[0] == pytest.approx(0.4, abs=1e-12)
    assert hi[0] - mean[0] == pytest.approx(0.4968275, abs=1e-6)
    assert mean[0] - lo[0] == pytest.approx(0.4968275, abs=1e-6)


def test_mean_ci_one_seed_has_no_interval() -> None:
    mean, lo, hi = rep.mean_ci(np.array([[0.3, 0.7]]))
    np.testing.assert_allclose(mean, [0.3, 0.7])
    assert np.isnan(lo).all() and np.isnan(hi).all()


def test_common_grid_interpolation_mean_and_ci_by_hand() -> None:
    grid = rep.common_grid([A, B])
    np.testing.assert_array_equal(grid, [100, 200, 250, 300])
    per_seed = rep.on_grid([A, B], grid)
    np.testing.assert_allclose(per_seed[0], [0.0, 0.5, 0.75, 1.0], atol=1e-12)
    np.testing.assert_allclose(per_seed[1], [0.2, 0.2 + 0.4 * 100 / 150, 0.6, 0.8], atol=1e-12)
    s = rep.summarise([A, B])
    np.testing.assert_allclose(s.mean, [0.1, (0.5 + 0.2 + 0.4 * 100 / 150) / 2, 0.675, 0.9], atol=1e-12)
    half = 12.7062047362 * np.abs(per_seed[0] - per_seed[1]) / 2
    np.testing.assert_allclose(s.hi - s.mean, half, atol=1e-7)
    assert s.hi[0] - s.mean[0] == pytest.approx(1.27062047, abs=1e-7)


def test_common_grid_clips_to_the_overlap_and_rejects_disjoint_runs() -> None:
    short = _curve([100, 200], [0.1, 0.2])
    np.testing.assert_array_equal(rep.common_grid([A, short]), [100, 200])
    with pytest.raises(ValueError, match="do not overlap"):
        rep.common_grid([_curve([0, 10], [0, 0]), _curve([20, 30], [0, 0])])


def test_steps_to_threshold_first_crossing_rule() -> None:
    s = rep.summarise([A, B])
    assert rep.steps_to_threshold(s.grid, s.mean, 0.5) == pytest.approx(200 + (0.5 - 0.4833333333) / 0.1916666667 * 50)
    assert rep.steps_to_threshold(s.grid, s.mean, 0.5) == pytest.approx(204.347826, abs=1e-5)
    assert rep.steps_to_threshold(s.grid, s.mean, 0.8) == pytest.approx(277.777778, abs=1e-5)
    assert rep.steps_to_threshold(s.grid, s.mean, 0.95) is None
    x = np.array([0.0, 10.0, 20.0, 30.0])
    # The first crossing counts, even if the curve dips below again later.
    assert rep.steps_to_threshold(x, np.array([0.0, 0.6, 0.3, 0.9]), 0.5) == pytest.approx(50 / 6)
    # Already above at the first evaluation: that step (nothing is known before it).
    assert rep.steps_to_threshold(x, np.array([0.7, 0.2, 0.9, 1.0]), 0.5) == 0.0
    # Reaching the threshold exactly at a grid point gives that point.
    assert rep.steps_to_threshold(x, np.array([0.0, 0.25, 0.5, 1.0]), 0.5) == pytest.approx(20.0)


def test_reach_counts_seeds_on_their_own_curves() -> None:
    s = rep.summarise([A, B])
    assert s.reach(0.9) == (pytest.approx(300.0), 1)  # the mean hits 0.9 at 300; only A (1.0) reaches it alone
    steps, seeds = s.reach(0.5)
    assert seeds == 2 and steps == pytest.approx(204.347826, abs=1e-5)


# ------------------------------------------------------------------------------------------------ metrics files


def test_load_curves_names_series_dedups_and_skips_nulls(tmp_path: Path) -> None:
    path = _write_metrics(tmp_path / "m.jsonl", [
        {"step": 50, "charts/updates": 1.0},
        {"step": 100, "eval/greedy/success": 0.25, "eval/greedy/success/grasp": 0.5, "eval/greedy/length": 3.0,
         "eval/heldout/greedy/success": 0.1, "eval/heldout/greedy/success/grasp": None},
        {"step": 200, "eval/greedy/success": 0.5, "eval/sample/success": 0.6, "eval/sample/length": 9.0,
         "eval/heldout/sample/success/grasp": 0.3},
        {"step": 200, "eval/greedy/success": 0.75},  # the final eval logged again at the same step: last one wins
    ])  # fmt: skip
    with path.open("a") as f:
        f.write('{"step": 300, "eval/greedy/succ')  # a torn last line
    curves = rep.load_curves(path)
    assert sorted(curves) == ["all", "grasp", "heldout", "sampled/all", "sampled/heldout/grasp"]
    assert rep.series_order(set(curves)) == ["all", "grasp", "heldout", "sampled/all", "sampled/heldout/grasp"]
    np.testing.assert_array_equal(curves["sampled/all"][1], [0.6])
    np.testing.assert_array_equal(curves["sampled/heldout/grasp"][1], [0.3])
    np.testing.assert_array_equal(curves["all"][0], [100, 200])
    np.testing.assert_array_equal(curves["all"][1], [0.25, 0.75])
    np.testing.assert_array_equal(curves["grasp"][1], [0.5])
    np.testing.assert_array_equal(curves["heldout"][1], [0.1])


def _fake_runs(root: Path) -> None:
    for method, runs in {"sac_her": (A, B), "sac": (_curve([100, 300], [0.0, 0.4]),) * 2}.items():
        for seed, (x, y) in enumerate(runs):
            _write_metrics(root / "bitflip" / method / f"seed{seed}" / "metrics.jsonl", [
                {"step": int(s), "eval/greedy/success": float(v), "eval/greedy/success/bitflip": float(v)}
                for s, v in zip(x, y, strict=True)
            ])  # fmt: skip


def test_aggregate_only_writes_the_table_and_plot(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    _fake_runs(runs)
    assert rep.main(["--aggregate-only", str(runs), "--out", str(out), "--name", "r"]) == 0
    md = (out / "r.md").read_text()
    assert (out / "r.png").stat().st_size > 1000
    # SAC + HER: final 0.9 with t-interval 0.9 +- 12.7062047 * 0.1 = [-0.371, 2.171]; 50% at 204, 80% at 278.
    assert "| bitflip | all | SAC + HER | 2 | 300 | 0.900 [-0.371, 2.171] | 204 (2/2) | 278 (2/2) | 300 (1/2) |" in md
    # SAC: two identical seeds, so a zero-width interval; never reaches 50%.
    assert "| bitflip | all | SAC | 2 | 300 | 0.400 [0.400, 0.400] | not reached (0/2) |" in md
    assert "| bitflip | bitflip | SAC + HER |" in md


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's IHDR chunk."""
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_series_keeps_only_those_panels(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _fake_runs(runs)
    rep.main(["--aggregate-only", str(runs), "--out", str(tmp_path), "--name", "every"])
    rep.main(["--aggregate-only", str(runs), "--out", str(tmp_path), "--name", "one", "--plot-series", "all"])
    # 4.5 x 3.4 inches per panel at 100 dpi and the legend's strip under them: two series (all, bitflip), then one.
    height = round(100 * (3.4 + rep.LEGEND_INCHES))
    assert _png_size(tmp_path / "every.png") == (900, height) and _png_size(tmp_path / "one.png") == (450, height)
    assert "| bitflip | bitflip | SAC + HER |" in (tmp_path / "one.md").read_text()  # the table keeps every series
    with pytest.raises(SystemExit, match="--plot-series sampled/all: not a series of these runs; they have all, "
                                         "bitflip"):
        rep.main(["--aggregate-only", str(runs), "--out", str(tmp_path), "--plot-series", "all,sampled/all"])


def test_aggregate_only_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"<env>/<method>/<seed>/metrics\.jsonl"):
        rep.aggregate(tmp_path)


def test_plan_runs_pairs_methods_and_rejects_unknown_envs(tmp_path: Path) -> None:
    runs = rep.plan_runs(["bitflip"], [0, 1], tmp_path, ["total_env_steps=64"])
    assert [(r.method, r.seed) for r in runs] == [("sac", 0), ("sac", 1), ("sac_her", 0), ("sac_her", 1),
                                                  ("ppo", 0), ("ppo", 1)]
    assert "experiment=bitflip_ppo" in runs[4].command()
    sac = runs[0].command()
    assert "buffer.her.ratio=0" in sac and "algo.hindsight_bc_coef=0" in sac and "experiment=bitflip_her" in sac
    assert "buffer.her.ratio=0" not in runs[2].command()
    assert f"hydra.run.dir={tmp_path / 'bitflip' / 'sac' / 'seed0'}" in sac and "seed=0" in sac
    with pytest.raises(ValueError, match="unknown env 'minihack'"):
        rep.plan_runs(["minihack"], [0], tmp_path, [])
    babyai = rep.plan_runs(["babyai", "textworld"], [0], tmp_path, [])
    assert [(r.env, r.method) for r in babyai] == [(env, m) for env in ("babyai", "textworld")
                                                   for m in ("sac", "sac_her", "ppo", "eto")]
    assert "experiment=babyai_eto" in babyai[3].command()
    assert "experiment=textworld_suite_sac_her" in babyai[5].command()
    assert "experiment=textworld_suite_eto" in babyai[7].command()


def test_plan_runs_with_algos_gives_ppo_its_on_policy_overrides_and_all_four_categories(tmp_path: Path) -> None:
    runs = rep.plan_runs(["playground", "bitflip"], [0], tmp_path, [], ["ppo", "sac_her"], quick=True)
    assert [(r.env, r.method) for r in runs] == [("playground", "ppo"), ("playground", "sac_her"),
                                                 ("bitflip", "ppo"), ("bitflip", "sac_her")]
    ppo, sac_her = runs[0].command(), runs[1].command()
    assert "experiment=playground_ppo" in ppo and "algo.rollout_steps=8" in ppo
    assert not any(o.startswith(("batch_size=", "learning_starts=", "buffer.")) for o in ppo)
    assert "batch_size=16" in sac_her and "algo.rollout_steps=8" not in sac_her
    cats = "env.kwargs.goal_categories=[grasp,grow_plant,grow_herbivore,grow_carnivore]"
    assert cats in ppo and cats in sac_her and cats not in runs[3].command()
    assert rep.plan_runs(["bitflip"], [0], tmp_path, [], ["eto"]) == []  # bitflip has no ETO preset: skipped
    with pytest.raises(ValueError, match="unknown method 'dqn'"):
        rep.plan_runs(["playground"], [0], tmp_path, [], ["dqn"])


def test_overrides_may_come_between_the_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``reproduce.py --envs playground a=1 --runs-dir R b=2`` keeps both overrides (plain parse_args refused b=2)."""
    argv = ["--envs", "playground", "--algos", "sac_her", "--seeds", "1", "eval.every=5000", "--runs-dir",
            str(tmp_path), "buffer.her.rare_fraction=0.5", "--dry-run"]
    assert rep.main(argv) == 0
    (command,) = capsys.readouterr().out.strip().splitlines()
    assert "eval.every=5000" in command and "buffer.her.rare_fraction=0.5" in command
    assert f"hydra.run.dir={tmp_path}/playground/sac_her/seed0" in command


def test_separation_of_bands_by_hand() -> None:
    grid = np.array([0.0, 10.0, 20.0])
    a = rep.Summary(grid, np.array([0.5, 0.9, 1.0]), np.array([0.1, 0.6, 0.95]), np.array([0.9, 1.0, 1.0]),
                    np.zeros((2, 3)))
    b = rep.Summary(grid, np.array([0.2, 0.3, 0.5]), np.array([0.0, 0.1, 0.3]), np.array([0.4, 0.5, 0.96]),
                    np.zeros((2, 3)))
    assert rep.separation(a, b) == (10.0, 1, 3)  # step 0 overlaps (0.1 < 0.4), 10 separates, 20 overlaps
    assert rep.separation(b, a) == (None, 0, 3)
    table = rep.format_separation({"playground": {"sac_her": {"grasp": a}, "ppo": {"grasp": b}}})
    assert "| playground | grasp | SAC + HER | PPO-GLAM | 10 | 1 / 3 |" in table


def test_separation_on_different_grids_interpolates_each_seed() -> None:
    a_seeds = np.array([[0.0, 0.8, 1.0], [0.0, 0.6, 1.0]])  # steps 0, 10, 20
    a = rep.Summary(np.array([0.0, 10.0, 20.0]), *rep.mean_ci(a_seeds), a_seeds)
    b_seeds = np.array([[0.1, 0.1], [0.0, 0.2]])  # steps 5, 25
    b = rep.Summary(np.array([5.0, 25.0]), *rep.mean_ci(b_seeds), b_seeds)
    # Overlap [5, 20]: steps 5, 10, 20. a at 5: seeds 0.4 and 0.3 (band 0.35 +- 12.706 * 0.0707 / 1.414 = +-0.635);
    # b at 5: 0.1 and 0.0. At 10: a 0.8, 0.6 (band [-0.57, 1.97]); b 0.1, 0.05 (hi 0.075 + 0.318 = 0.393): overlap.
    # At 20: a 1.0, 1.0 (band [1, 1]); b 0.1, 0.15 (hi 0.125 + 0.318 = 0.443): a above.
    assert rep.separation(a, b) == (20.0, 1, 3)
    assert rep.separation(b, a) == (None, 0, 3)


def test_wall_minutes_from_done_files(tmp_path: Path) -> None:
    for method, secs in (("ppo", 60.0), ("ppo", 180.0), ("sac", 30.0)):
        d = tmp_path / "playground" / method / f"seed{int(secs)}"
        d.mkdir(parents=True)
        (d / "DONE").write_text(f"python train.py\nseconds {secs}\n")
    (tmp_path / "playground" / "sac" / "old").mkdir()
    (tmp_path / "playground" / "sac" / "old" / "DONE").write_text("python train.py\n")  # before timings: left out
    walls = {k: sorted(v) for k, v in rep.wall_minutes(tmp_path).items()}
    assert walls == {("playground", "ppo"): [1.0, 3.0], ("playground", "sac"): [0.5]}
    assert "| playground | PPO-GLAM | 2 | 2.0 (1.0-3.0) |" in rep.format_wall(tmp_path)


# --------------------------------------------------------------------------------------------------- bench maths


def test_update_flops_by_hand() -> None:
    bench = _load("bench")
    # trunk, online: 10 prompt tokens x 100 + 4 candidate tokens x 150 = 1600 -> x6 = 9600
    # trunk, target (non-terminal rows): 5 x 100 + 2 x 150 = 800 -> x2 = 1600
    # heads (7 weights): forward on 2 + 1 present candidates -> 2 x 7 x 3 = 42; backward on 3 taken -> 4 x 7 x 3 = 84
    assert bench.update_flops(100, 150, 7, (10, 4, 2), (5, 2, 1), 3) == 9600 + 1600 + 42 + 84


def test_path_params_of_a_small_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _load("bench")
    cfg = LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    # one layer: q,k,v,o 4 x 8 x 8 = 256, MLP 3 x 8 x 16 = 384, two norms 16, final norm 8 -> 664; head 50 x 8 = 400
    assert bench.path_params(model) == (664, 664 + 400)


@pytest.mark.integration
def test_bench_out_of_memory_retries_with_more_micro_batches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    bench = _load("bench")
    tried: list[list[str]] = []

    def fake(name: str, opts: object, device: object, extra: list[str]) -> dict[str, object]:
        tried.append(list(extra))
        if extra != ["algo.grad_accum=4"]:
            raise torch.OutOfMemoryError("fake")
        return {"model": name, "grad accum": 4}

    monkeypatch.setattr(bench, "bench_model", fake)
    rows = bench.main(["--quick", "--out", str(tmp_path / "b.md")])
    assert tried == [["algo.grad_accum=1"], ["algo.grad_accum=2"], ["algo.grad_accum=4"]]
    assert rows == [{"model": "tiny", "grad accum": 4}]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        bench.main(["--quick", "--max-grad-accum", "2"])
    assert tried == [["algo.grad_accum=1"], ["algo.grad_accum=2"]]


# ------------------------------------------------------------------------------------------------- quick smoke runs


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.integration
def test_bench_quick_runs_and_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--threads", "1",
                           "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| model | grad accum | trainable | env steps/s | updates/s | scored tok/s |" in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1"  # batch 16 fits: no out-of-memory retry
    assert float(cells[3].replace(",", "")) > 0 and float(cells[4].replace(",", "")) > 0  # env steps/s, updates/s


@pytest.mark.integration
def test_reproduce_quick_bitflip_two_seeds(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--envs", "bitflip",
           "--algos", "sac,sac_her", "--steps", "128", "--runs-dir", str(runs), "--out", str(out),
           "eval.every=64"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "reproduce_quick.md").read_text()
    assert "Quick mode" in md and (out / "reproduce_quick.png").is_file()
    assert "| bitflip | all | SAC | 2 | 128 |" in md and "| bitflip | all | SAC + HER | 2 | 128 |" in md
    assert "PPO-GLAM" not in md and not (runs / "bitflip" / "ppo").exists()  # --algos leaves BitFlip's PPO out
    for method in ("sac", "sac_her"):
        for seed in (0, 1):
            assert (runs / "bitflip" / method / f"seed{seed}" / "DONE").is_file()
    # A rerun skips the finished runs.
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.count("skip (done)") == 4


@pytest.mark.slow
@pytest.mark.ci
def test_reproduce_quick_both_envs(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--quick", "--runs-dir", str(tmp_path / "runs"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (tmp_path / "out" / "reproduce_quick.md").read_text()
    assert "| playground | grasp | SAC + HER | 2 |" in md and "| bitflip | all | SAC | 2 |" in md
    assert "| playground | grasp | ETO | 2 |" in md and "| playground | grasp | PPO-GLAM | 2 |" in md


def test_floors_parse() -> None:
    assert rep.parse_floors(["babyai=0.28", "textworld=0.45"]) == {"babyai": 0.28, "textworld": 0.45}
    for bad in ("babyai", "babyai=x", "=0.2", "babyai=1.5"):
        with pytest.raises(SystemExit, match="expected ENV=SUCCESS"):
            rep.parse_floors([bad])


def test_aggregate_only_with_a_floor_lists_it(tmp_path: Path) -> None:
    _fake_runs(tmp_path / "runs")
    rep.main(["--aggregate-only", str(tmp_path / "runs"), "--out", str(tmp_path), "--name", "r",
              "--floor", "bitflip=0.004"])
    md = (tmp_path / "r.md").read_text()
    assert "Uniform random agent (`scripts/random_baseline.py`, dashed in the plot): bitflip 0.004." in md
    assert "| bitflip | all | SAC + HER |" in md
