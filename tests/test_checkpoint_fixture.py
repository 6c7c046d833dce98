"""Checkpoints written before the package was reorganised (2026-12-07, commit 7c91ca0) still resume, exactly.

``tests/data/checkpoint_2026_12_07/`` holds, for SAC + HER and PPO-GLAM, the env-step-160 checkpoint of a small run
(the ``ARGS`` below, ``total_env_steps=256``) and that run's ``metrics.jsonl``, both written by the code of that
commit. Resuming the checkpoint with today's code must give the same rows: the ones up to step 160 (restored from the
run folder) and the ones after it (computed again). Floats are compared to a relative 1e-5: the recorded rows came
from another machine's CPU, whose kernels may round differently in the last bits.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.test_train import _comparable, read_metrics, run_train

DATA = Path(__file__).resolve().parent / "data" / "checkpoint_2026_12_07"
COMMON = ["eval.episodes_per_category=2", "eval.num_envs=2", "env.corpus_episodes=20", "time_limit_min=0",
          "threads=1", "logger.progress=false", "total_env_steps=256", "checkpoint.every=160", "checkpoint.keep=2",
          "eval.every=128", "seed=7"]
ARGS = {
    "sac": ["experiment=playground_sac_her", "env.num_envs=4", "batch_size=8", "learning_starts=48",
            "buffer.capacity=256", *COMMON],
    "ppo": ["algo=ppo", "env.num_envs=4", "algo.rollout_steps=8", "algo.minibatch_size=16", *COMMON],
}


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-7)
    return bool(a == b)


@pytest.mark.integration
@pytest.mark.parametrize("algo", sorted(ARGS))
def test_pre_reorganisation_checkpoint_resumes_to_the_recorded_rows(algo: str, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(DATA / f"{algo}.pt", tmp_path / "checkpoints" / "step_0000000160.pt")
    lines = (DATA / f"{algo}.metrics.jsonl").read_text().splitlines()
    # The run folder as the killed run left it: its rows up to the checkpoint (the ones after it are recomputed).
    (tmp_path / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= 160))
    result = run_train([*ARGS[algo], "resume=auto"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at env step 160" in result.stdout
    expected = _comparable([json.loads(line) for line in lines])
    got = _comparable(read_metrics(tmp_path))
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert any(r["step"] > 160 and "eval/greedy/success" in r for r in got), "no evaluation after the resume"
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys(), f"step {want['step']}: keys differ"
        bad = {k: (want[k], have[k]) for k in want if not _close(want[k], have[k])}
        assert not bad, f"step {want['step']}: {bad}"
