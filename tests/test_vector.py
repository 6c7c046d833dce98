"""Tests of envs/vector.py: auto-reset, errors from envs and workers, sync == subprocess, close, and the env scripts.

Most tests use ``CounterEnv`` below, whose episodes are a hand-computable function of the seed, so the expected
observations, rewards and final infos are written out exactly.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from envs import TextEnvBase
from envs.vector import (
    EnvWorkerError,
    SubprocVectorTextEnv,
    SyncVectorTextEnv,
    VectorStepResult,
    make_vector_env,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sync", "subprocess")


class CounterEnv(TextEnvBase):
    """Count up to a target. Episode e after ``reset(seed=s)`` has target ``(s + e) % 3 + 1`` and step limit 3.

    Reset options: ``{"target": t}`` sets the target, ``{"crash": True}`` raises ValueError.

    Actions: ``inc`` (count + 1; reward 1 and terminated at the target), ``wait`` (nothing), ``crash`` (raises
    RuntimeError), ``die`` (the process exits with code 3), ``hang`` (sleeps 60 s). The "RNG" is the pair
    (seed, episode), so auto-resets continue it deterministically, as a real env's ``np_random`` does.
    """

    limit = 3

    def __init__(self, fail_on_make: bool = False) -> None:
        super().__init__()
        if fail_on_make:
            raise RuntimeError("CounterEnv was asked to fail at construction")
        self.goal_categories = ["count"]
        self._seed = 0
        self._episode = -1
        self.target = 0
        self.count = 0
        self.t = 0

    def _obs(self) -> str:
        return f"ep {self._episode} target {self.target} count {self.count}"

    def _info(self, achieved: list[str]) -> dict[str, Any]:
        return {
            "goal": f"reach {self.target}",
            "goal_category": "count",
            "admissible_actions": ["inc", "wait", "crash", "die", "hang"],
            "achieved_goals": achieved,
            "count": self.count,
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        if options and options.get("crash"):
            raise ValueError("CounterEnv was asked to fail at reset")
        if seed is not None:
            self._seed, self._episode = seed, 0
        else:
            self._episode += 1
        self.target = (self._seed + self._episode) % 3 + 1
        if options and "target" in options:
            self.target = int(options["target"])
        self.count, self.t = 0, 0
        return self._obs(), self._info([])

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._check_action(action, ["inc", "wait", "crash", "die", "hang"])
        if action == "crash":
            raise RuntimeError("boom from CounterEnv")
        if action == "die":
            os._exit(3)
        if action == "hang":
            time.sleep(60)
        self.t += 1
        achieved = []
        if action == "inc":
            self.count += 1
            achieved = [f"reach {self.count}"]
        terminated = self.count == self.target
        truncated = not terminated and self.t >= self.limit
        return self._obs(), float(terminated), terminated, truncated, self._info(achieved)

    def goal_category(self, goal: str) -> str:
        return "count"

    def goal_step_limit(self, goal: str) -> int | None:
        return self.limit

    def expert_action(self) -> str:
        return "inc"


def make_counter(n: int, mode: str, **kwargs: Any) -> SyncVectorTextEnv | SubprocVectorTextEnv:
    fns = [CounterEnv] * n
    if mode == "sync":
        return SyncVectorTextEnv(fns)
    return SubprocVectorTextEnv(fns, **kwargs)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_reset_seeds_env_i_with_seed_plus_i_and_options(mode: str) -> None:
    venv = make_counter(3, mode)
    try:
        obs, infos = venv.reset(seed=10)
        # targets (10 + 0) % 3 + 1 = 2, (11) % 3 + 1 = 3, (12) % 3 + 1 = 1
        assert obs == ["ep 0 target 2 count 0", "ep 0 target 3 count 0", "ep 0 target 1 count 0"]
        assert [i["goal"] for i in infos] == ["reach 2", "reach 3", "reach 1"]
        obs, _ = venv.reset(seed=10, options=[None, {"target": 1}, None])
        assert obs == ["ep 0 target 2 count 0", "ep 0 target 1 count 0", "ep 0 target 1 count 0"]
        with pytest.raises(ValueError, match="one dict \\(or None\\) per env"):
            venv.reset(options=[None])
    finally:
        venv.close()


def test_auto_reset_delivers_final_observation_and_info(mode: str) -> None:
    venv = make_counter(2, mode)
    try:
        venv.reset(seed=0)  # env 0: target 1; env 1: target 2
        out = venv.step(["inc", "inc"])
        assert isinstance(out, VectorStepResult)
        # env 0 reached its target: the next episode (episode 1, target (0 + 1) % 3 + 1 = 2) is already there.
        assert out.observations == ["ep 1 target 2 count 0", "ep 0 target 2 count 1"]
        np.testing.assert_array_equal(out.rewards, np.array([1.0, 0.0], dtype=np.float32))
        assert out.rewards.dtype == np.float32 and out.terminated.dtype == bool and out.truncated.dtype == bool
        np.testing.assert_array_equal(out.terminated, [True, False])
        np.testing.assert_array_equal(out.truncated, [False, False])
        assert out.infos[0]["final_observation"] == "ep 0 target 1 count 1"
        assert out.infos[0]["final_info"] == {
            "goal": "reach 1",
            "goal_category": "count",
            "admissible_actions": ["inc", "wait", "crash", "die", "hang"],
            "achieved_goals": ["reach 1"],
            "count": 1,
        }
        assert out.infos[0]["goal"] == "reach 2" and out.infos[0]["achieved_goals"] == []
        assert "final_observation" not in out.infos[1] and "final_info" not in out.infos[1]

        # Truncation also auto-resets: env 1 waits until the step limit 3 (it has taken 1 step).
        venv.step(["wait", "wait"])
        out = venv.step(["wait", "wait"])
        np.testing.assert_array_equal(out.terminated, [False, False])
        np.testing.assert_array_equal(out.truncated, [False, True])
        assert out.infos[1]["final_observation"] == "ep 0 target 2 count 1"
        assert out.infos[1]["final_info"]["achieved_goals"] == []
        # env 1 episode 1: target (1 + 1) % 3 + 1 = 3
        assert out.observations == ["ep 1 target 2 count 0", "ep 1 target 3 count 0"]
    finally:
        venv.close()


def test_step_checks_its_arguments(mode: str) -> None:
    venv = make_counter(2, mode)
    try:
        with pytest.raises(RuntimeError, match="before reset"):
            venv.step(["inc", "inc"])
        venv.reset(seed=0)
        with pytest.raises(ValueError, match="one action string per env"):
            venv.step(["inc"])
        with pytest.raises(ValueError, match="one action string per env"):
            venv.step("ii")
    finally:
        venv.close()


def test_env_exception_raises_env_worker_error_naming_env_and_seed(mode: str) -> None:
    venv = make_counter(3, mode)
    try:
        venv.reset(seed=5)
        venv.step(["inc", "wait", "inc"])
        with pytest.raises(EnvWorkerError) as info:
            venv.step(["wait", "crash", "wait"])
        err = info.value
        assert (err.index, err.env_id, err.seed, err.exc_type) == (1, "CounterEnv", 6, "RuntimeError")
        assert (err.episode, err.step, err.command) == (0, 1, "step('crash')")
        text = str(err)
        assert "env 1 (CounterEnv, seed=6" in text and "boom from CounterEnv" in text
        # The original traceback names the line that raised.
        assert 'raise RuntimeError("boom from CounterEnv")' in err.worker_traceback
        # The batch is inconsistent now: stepping needs a reset, after which everything works again.
        with pytest.raises(RuntimeError, match="call reset"):
            venv.step(["inc", "inc", "inc"])
        obs, _ = venv.reset(seed=5)
        assert obs[1] == "ep 0 target 1 count 0"
        assert venv.step(["inc", "inc", "inc"]).terminated.tolist() == [False, True, False]
    finally:
        venv.close()


def test_reset_exception_names_the_seed_being_applied(mode: str) -> None:
    venv = make_counter(2, mode)
    try:
        with pytest.raises(EnvWorkerError, match="asked to fail at reset") as info:
            venv.reset(seed=20, options=[None, {"crash": True}])
        assert (info.value.index, info.value.seed, info.value.command) == (1, 21, "reset")
        with pytest.raises(RuntimeError, match="call reset"):
            venv.step(["inc", "inc"])
    finally:
        venv.close()


def test_invalid_action_is_reported_with_the_admissible_ones(mode: str) -> None:
    venv = make_counter(2, mode)
    try:
        venv.reset(seed=0)
        with pytest.raises(EnvWorkerError, match="'jump' is not admissible") as info:
            venv.step(["inc", "jump"])
        assert info.value.exc_type == "InvalidActionError" and info.value.index == 1
    finally:
        venv.close()


def test_construction_failure_names_the_env(mode: str) -> None:
    fns: list[Callable[[], CounterEnv]] = [CounterEnv, functools.partial(CounterEnv, fail_on_make=True)]
    with pytest.raises(EnvWorkerError, match="asked to fail at construction") as info:
        SyncVectorTextEnv(fns) if mode == "sync" else SubprocVectorTextEnv(fns)
    assert info.value.index == 1 and info.value.command == "make"


def test_unpicklable_env_fn_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"env_fns\[1\] .* not a lambda or closure"):
        SubprocVectorTextEnv([CounterEnv, lambda: CounterEnv()])


def test_sync_and_subprocess_give_identical_results() -> None:
    rng = random.Random(1234)
    actions = [[rng.choice(["inc", "wait"]) for _ in range(3)] for _ in range(25)]
    runs = []
    for mode in MODES:
        venv = make_counter(3, mode)
        try:
            trace: list[Any] = [venv.reset(seed=42)]
            for a in actions:
                out = venv.step(a)
                trace.append((out.observations, out.rewards.tolist(), out.terminated.tolist(),
                              out.truncated.tolist(), out.infos))  # fmt: skip
            trace.append(venv.call("target"))
            runs.append(trace)
        finally:
            venv.close()
    assert runs[0] == runs[1]
    n_finished = sum(sum(t) + sum(u) for _, _, t, u, _ in runs[0][1:-1])
    assert n_finished >= 10  # the actions really exercise auto-reset


def test_call_methods_and_attributes(mode: str) -> None:
    venv = make_counter(2, mode)
    try:
        venv.reset(seed=1)  # targets 2 and 3
        assert venv.call("target") == [2, 3]
        assert venv.call("goal_step_limit", "reach 2") == [3, 3]
        assert venv.call("goal_categories") == [["count"], ["count"]]
        with pytest.raises(EnvWorkerError, match="no_such_thing"):
            venv.call("no_such_thing")
    finally:
        venv.close()


def test_close_twice_and_use_after_close(mode: str) -> None:
    venv = make_counter(2, mode)
    venv.reset(seed=0)
    venv.close()
    venv.close()
    with pytest.raises(RuntimeError, match="is closed"):
        venv.reset(seed=0)
    if isinstance(venv, SubprocVectorTextEnv):
        assert all(not p.is_alive() for p in venv._processes)


def test_dead_worker_raises_and_closes() -> None:
    venv = SubprocVectorTextEnv([CounterEnv] * 2)
    venv.reset(seed=3)
    start = time.monotonic()
    with pytest.raises(EnvWorkerError, match="exited with code 3") as info:
        venv.step(["wait", "die"])
    assert time.monotonic() - start < 10
    assert (info.value.index, info.value.seed, info.value.exc_type) == (1, 4, "WorkerDied")
    assert venv.closed and all(not p.is_alive() for p in venv._processes)
    venv.close()


def test_hung_worker_times_out() -> None:
    venv = SubprocVectorTextEnv([CounterEnv] * 2)  # the default timeout, so a slow start on a busy machine passes
    venv.timeout = 1.0
    venv.reset(seed=0)
    start = time.monotonic()
    with pytest.raises(EnvWorkerError, match=r"no answer within timeout=1\.0") as info:
        venv.step(["hang", "wait"])
    assert time.monotonic() - start < 15
    assert info.value.index == 0 and info.value.exc_type == "Timeout"
    assert venv.closed and all(not p.is_alive() for p in venv._processes)


def test_make_vector_env_checks_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        make_vector_env("sacglam/BitFlipText-v0", 2, mode="threads")
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        make_vector_env("sacglam/BitFlipText-v0", 0)
    with pytest.raises(ValueError, match="unknown env id 'sacglam/Nope-v0'"):
        make_vector_env("sacglam/Nope-v0", 2)


def _has_env(module: str) -> bool:
    return (ROOT / "envs" / f"{module}.py").exists()


REAL_ENVS = [
    pytest.param("sacglam/BitFlipText-v0", {"n_bits": 8}, marks=pytest.mark.skipif(
        not _has_env("bitflip_text"), reason="envs/bitflip_text.py not written yet")),
    pytest.param("sacglam/PlaygroundText-v0", {}, marks=pytest.mark.skipif(
        not _has_env("playground_text"), reason="envs/playground_text.py not written yet")),
    pytest.param("sacglam/BabyAIText-v0", {"level": "BabyAI-GoToLocal-v0"}, marks=pytest.mark.skipif(
        not _has_env("babyai_text"), reason="envs/babyai_text.py not written yet")),
]  # fmt: skip


def _sync_equals_subprocess(env_id: str, kwargs: dict[str, Any], n_steps: int) -> None:
    """Random admissible actions (same RNG) on 3 envs in both modes: every output must match, episodes must end."""
    runs = []
    for mode in MODES:
        venv = make_vector_env(env_id, 3, env_kwargs=kwargs, mode=mode)
        rng = random.Random(7)
        try:
            obs, infos = venv.reset(seed=100)
            trace: list[Any] = [obs, infos]
            finished = 0
            for _ in range(n_steps):
                out = venv.step([rng.choice(i["admissible_actions"]) for i in infos])
                for i in np.flatnonzero(out.terminated | out.truncated):
                    finished += 1
                    # The final info is the finished episode's: the goal it was pursuing before the auto-reset.
                    assert out.infos[i]["final_info"]["goal"] == infos[i]["goal"]
                    assert isinstance(out.infos[i]["final_observation"], str)
                infos = out.infos
                trace.append(out.observations)
                trace.append(out.infos)
                trace.append(out.rewards.tolist())
            assert finished > 0
            runs.append(trace)
        finally:
            venv.close()
    assert runs[0] == runs[1]


@pytest.mark.parametrize(("env_id", "kwargs"), REAL_ENVS)
def test_real_env_sync_equals_subprocess_with_auto_reset(env_id: str, kwargs: dict[str, Any]) -> None:
    # BabyAI episodes last up to 64 steps under random play; Playground and BitFlip at most 15.
    _sync_equals_subprocess(env_id, kwargs, 150 if "BabyAI" in env_id else 40)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.skipif(not _has_env("textworld_env"), reason="envs/textworld_env.py not written yet")
def test_textworld_sync_equals_subprocess(tmp_path: Path) -> None:
    game = tmp_path / "coin.z8"
    tw_make = str(Path(sys.executable).parent / "tw-make")
    subprocess.run(
        [tw_make, "tw-coin_collector", "--level", "1", "--seed", "3", "--output", str(game), "-f"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    _sync_equals_subprocess("sacglam/TextWorld-v0", {"game": str(game), "max_steps": 10}, 30)


@pytest.mark.integration
@pytest.mark.parametrize("script", ["random_baseline.py", "bench_envs.py"])
def test_scripts_run_quick(script: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout and "---" in proc.stdout  # a markdown table was printed


def test_vector_envs_satisfy_the_collector_protocol() -> None:
    from sacglam.collector import VectorTextEnv

    # mypy checks these assignments structurally; at run time they drive both through the protocol's methods.
    for venv in (make_counter(2, "sync"), make_counter(2, "subprocess")):
        as_protocol: VectorTextEnv = venv
        try:
            assert as_protocol.num_envs == 2
            as_protocol.reset(seed=0)
            assert as_protocol.step(["inc", "inc"]).observations == ["ep 1 target 2 count 0", "ep 0 target 2 count 1"]
        finally:
            venv.close()


@pytest.mark.parametrize("env_mode", MODES)
def test_get_state_set_state_continues_exactly(env_mode: str) -> None:
    """A vector env restored from get_state() mid-episode continues exactly like the uninterrupted one."""

    def run(venv: SyncVectorTextEnv | SubprocVectorTextEnv, infos: list[dict[str, Any]], rng: random.Random,
            n: int) -> tuple[list[Any], list[dict[str, Any]]]:
        trace: list[Any] = []
        for _ in range(n):
            out = venv.step([rng.choice(i["admissible_actions"]) for i in infos])
            infos = out.infos
            trace += [out.observations, out.rewards.tolist(), out.terminated.tolist(), [i["goal"] for i in infos]]
        return trace, infos

    kwargs = {"goal_categories": ["grasp", "grow_plant"]}
    ref = make_vector_env("sacglam/PlaygroundText-v0", 3, env_kwargs=kwargs, mode=env_mode)
    restored = make_vector_env("sacglam/PlaygroundText-v0", 3, env_kwargs=kwargs, mode=env_mode)
    try:
        _, infos = ref.reset(seed=5)
        _, infos = run(ref, infos, random.Random(1), 7)  # mid-episode for some envs
        state = ref.get_state()
        rng_state = random.Random(2)
        expected, _ = run(ref, infos, rng_state, 30)
        restored.reset(seed=999)  # a different history, overwritten by set_state
        restored.set_state(state)
        got, _ = run(restored, infos, random.Random(2), 30)
        assert got == expected
    finally:
        ref.close()
        restored.close()


def test_get_state_of_unpicklable_env_is_a_clear_type_error() -> None:
    class Unpicklable(CounterEnv):
        def __init__(self) -> None:
            super().__init__()
            self.handle = lambda: None  # lambdas cannot be pickled, like a live game process

    venv = SyncVectorTextEnv([Unpicklable])
    venv.reset(seed=0)
    with pytest.raises(TypeError, match="cannot be saved mid-episode"):
        venv.get_state()
    venv.close()


def test_random_baseline_measures_one_env_with_constructor_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.scripts_util import load_script

    rb = load_script("random_baseline")
    code = rb.main(["--only", "playground", "--episodes", "4", "--env-kwargs", '{"goal_categories": ["grasp"]}'])
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| Playground")]
    assert [r.split("|")[2].strip() for r in rows] == ["grasp"]  # the kwargs reached the env; one env measured
    assert rows[0].split("|")[3].strip() == "4"
    with pytest.raises(SystemExit):
        rb.main(["--only", "no-such-env"])
    with pytest.raises(SystemExit):
        rb.main(["--only", "playground", "--env-kwargs", "[1]"])
