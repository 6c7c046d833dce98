"""scripts/sweep.py (sacglam/run/sweep.py): the grid, the point folders and the report from finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sacglam.run import sweep
from sacglam.run.launch import DONE_FILE, Run


def test_parse_grid_keeps_order_and_values() -> None:
    grid = sweep.parse_grid(["algo.lr=1e-3, 3e-3", "algo.ent_coef=0"])
    assert grid == [("algo.lr", ["1e-3", "3e-3"]), ("algo.ent_coef", ["0"])]


@pytest.mark.parametrize("bad", ["algo.lr", "=1,2", "algo.lr=", "algo.lr=1,,2"])
def test_parse_grid_rejects_malformed_options(bad: str) -> None:
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        sweep.parse_grid([bad])


def test_parse_grid_rejects_a_key_given_twice() -> None:
    with pytest.raises(ValueError, match="given twice"):
        sweep.parse_grid(["algo.lr=1", "algo.lr=2"])


def test_a_plus_joined_key_is_one_axis_setting_every_part() -> None:
    grid = sweep.parse_grid(["algo.lr_actor+algo.lr_critic=1e-3,3e-3"])
    assert grid == [("algo.lr_actor+algo.lr_critic", ["1e-3", "3e-3"])]
    assert sweep.point_overrides([(grid[0][0], "3e-3"), ("algo.tau", "0.01")]) == \
        ["algo.lr_actor=3e-3", "algo.lr_critic=3e-3", "algo.tau=0.01"]
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        sweep.parse_grid(["algo.lr_actor+=1"])


def test_point_name() -> None:
    assert sweep.point_name([("algo.lr", "1e-3"), ("env.kwargs.games", "g/*.z8")]) == \
        "algo.lr_1e-3__env.kwargs.games_g--.z8"
    assert sweep.point_name([("algo.lr_actor+algo.lr_critic", "3e-4")]) == "algo.lr_actor-algo.lr_critic_3e-4"
    assert sweep.point_name([]) == "preset"


def _finished_run(run_dir: Path, curve: dict[int, tuple[float, float]], minutes: float) -> None:
    """A finished run: greedy and sampled success at each step, and a DONE file (so the sweep does not rerun it)."""
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step, (greedy, sampled) in curve.items():
            f.write(json.dumps({"step": step, "eval/greedy/success": greedy, "eval/sample/success": sampled}) + "\n")
    (run_dir / DONE_FILE).write_text(f"python train.py\nseconds {minutes * 60:.1f}\n")


def test_main_reports_final_and_mean_success_and_ranks_by_the_mean(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    # lr 1e-3: learns early (sampled 0.5, 1.0, 1.0); lr 3e-3: learns late but ends higher on greedy.
    for seed, late in ((0, 0.0), (1, 0.2)):
        _finished_run(runs / "algo.lr_1e-3" / "babyai" / "ppo" / f"seed{seed}",
                      {1000: (0.1, 0.5), 2000: (0.4, 1.0), 3000: (0.6, 1.0)}, minutes=2.0)
        _finished_run(runs / "algo.lr_3e-3" / "babyai" / "ppo" / f"seed{seed}",
                      {1000: (0.0, late), 2000: (0.0, late), 3000: (1.0, 1.0)}, minutes=4.0)
    out = tmp_path / "sweep.md"
    rc = sweep.main(["--env", "babyai", "--algo", "ppo", "--grid", "algo.lr=1e-3,3e-3", "--seeds", "2",
                     "--steps", "3000", "--series", "sampled/all,all", "--runs-dir", str(runs), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    # by hand: sampled mean over evaluations (0.5 + 1 + 1) / 3 = 0.833; lr 3e-3: (0.1 + 0.1 + 1) / 3 = 0.4
    assert "| 1e-3 | 1.000 / 0.833 | 0.600 / 0.367 | 2.0 |" in text
    assert "| 3e-3 | 1.000 / 0.400 | 1.000 / 0.333 | 4.0 |" in text
    assert "Best by mean sampled/all: algo.lr=1e-3 (0.833)" in text
    assert "best: algo.lr=1e-3" in capsys.readouterr().out
    # ranked by the final greedy success instead, the late learner wins
    rc = sweep.main(["--env", "babyai", "--algo", "ppo", "--grid", "algo.lr=1e-3,3e-3", "--seeds", "2",
                     "--series", "all", "--rank", "final", "--runs-dir", str(runs), "--out", str(out)])
    assert rc == 0 and "Best by final all: algo.lr=3e-3 (1.000)" in out.read_text()


def test_main_rejects_a_method_the_env_has_no_preset_for(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep, "execute", lambda run: pytest.fail(f"a run was started: {run}"))
    with pytest.raises(SystemExit):
        sweep.main(["--env", "bitflip", "--algo", "eto", "--grid", "algo.lr=1", "--runs-dir", str(tmp_path)])
    assert "bitflip has no 'eto' preset" in capsys.readouterr().err


def test_main_runs_every_point_with_the_preset_and_its_overrides(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    planned: list[Run] = []

    def fake_execute(run: Run) -> tuple[Run, int, float]:
        planned.append(run)
        _finished_run(run.run_dir, {500: (0.5, 0.5)}, minutes=1.0)
        return run, 0, 0.0

    monkeypatch.setattr(sweep, "execute", fake_execute)
    rc = sweep.main(["--env", "babyai", "--algo", "sac_her", "--grid", "algo.lr_actor+algo.lr_critic=3e-4,1e-3",
                     "--grid", "algo.target_entropy_ratio=0.3,0.6", "--seeds", "2", "--steps", "500",
                     "--runs-dir", str(tmp_path), "eval.every=250"])
    assert rc == 0 and len(planned) == 2 * 2 * 2
    one = next(r for r in planned if r.seed == 1 and "algo.lr_actor=1e-3" in r.overrides
               and "algo.target_entropy_ratio=0.3" in r.overrides)
    assert one.overrides[0] == "experiment=babyai_sac_her"
    assert {"algo.lr_critic=1e-3", "total_env_steps=500", "eval.every=250"} <= set(one.overrides)
    assert one.run_dir == (tmp_path / "algo.lr_actor-algo.lr_critic_1e-3__algo.target_entropy_ratio_0.3"
                           / "babyai" / "sac_her" / "seed1")
    assert "| 3e-4 | 0.3 | 0.500 / 0.500 | 1.0 |" in (tmp_path / "sweep.md").read_text()


def test_a_point_whose_runs_all_failed_is_reported_as_nan_not_a_crash(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_execute(run: Run) -> tuple[Run, int, float]:
        run.run_dir.mkdir(parents=True)
        return run, 1, 0.0

    monkeypatch.setattr(sweep, "execute", failing_execute)
    rc = sweep.main(["--env", "babyai", "--algo", "ppo", "--grid", "algo.lr=1e-3", "--runs-dir", str(tmp_path)])
    assert rc == 1 and "| 1e-3 | nan / nan | - |" in (tmp_path / "sweep.md").read_text()
