"""Collector tests on a tiny deterministic counting env, checked against hand-computed transitions.

``CountEnv`` and ``MiniSyncVec`` are also used by tests/test_evaluate.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from envs.base import TextEnvBase
from sacglam.collector import Collector, EpisodeStats, episode_metrics, episode_success
from sacglam.types import ActOutput

GOAL_CATEGORIES = {"near": ["Reach 1"], "far": ["Reach 2", "Reach 3"]}


class CountEnv(TextEnvBase):
    """A walker on the integers from 0: ``go <p+1>``, ``stay``, ``go <p-1>`` (when p > 0).

    Goal ``Reach k``; moving onto p achieves ``Reach p``; reaching the goal pays 1 and terminates. Goals come from
    ``options`` (``goal`` or ``goal_category``), else cycle through ``goals`` on each plain reset. Step limit
    ``limit`` when given, else ``k + 1``.
    """

    goal_categories: ClassVar[list[str]] = list(GOAL_CATEGORIES)

    def __init__(
        self, goals: Sequence[str] = ("Reach 1",), limit: int | None = None, verdict_key: str | None = None
    ) -> None:
        super().__init__()
        self.goals = list(goals)
        self.limit = limit
        self.verdict_key = verdict_key  # report success under info[verdict_key] (inverted, to prove it is used)
        self._n_resets = 0
        self.goal = self.goals[0]
        self.pos = 0
        self.t = 0

    def goal_category(self, goal: str) -> str:
        return next(c for c, gs in GOAL_CATEGORIES.items() if goal in gs)

    def goal_step_limit(self, goal: str) -> int | None:
        return self.limit if self.limit is not None else int(goal.split()[1]) + 1

    def expert_action(self) -> str:
        return f"go {self.pos + 1}"

    def _actions(self) -> list[str]:
        return [f"go {self.pos + 1}", "stay"] + ([f"go {self.pos - 1}"] if self.pos > 0 else [])

    def _info(self, achieved: list[str]) -> dict[str, Any]:
        return {
            "goal": self.goal,
            "goal_category": self.goal_category(self.goal),
            "admissible_actions": self._actions(),
            "achieved_goals": achieved,
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        if "goal" in options:
            if not any(options["goal"] in gs for gs in GOAL_CATEGORIES.values()):
                raise ValueError(f"unknown goal {options['goal']!r}")
            self.goal = options["goal"]
        elif "goal_category" in options:
            choices = GOAL_CATEGORIES[options["goal_category"]]
            self.goal = choices[int(self.np_random.integers(len(choices)))]
        else:
            self.goal = self.goals[self._n_resets % len(self.goals)]
        self._n_resets += 1
        self.pos, self.t = 0, 0
        return f"pos {self.pos}", self._info([])

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._check_action(action, self._actions())
        achieved: list[str] = []
        if action.startswith("go "):
            self.pos = int(action.split()[1])
            achieved = [f"Reach {self.pos}"]
        self.t += 1
        reward = self.compute_reward(achieved, self.goal)
        terminated = reward > 0
        truncated = not terminated and self.t >= self.goal_step_limit(self.goal)  # type: ignore[operator]
        info = self._info(achieved)
        if self.verdict_key is not None:
            info[self.verdict_key] = not terminated
        return f"pos {self.pos}", reward, terminated, truncated, info


@dataclass
class MiniStep:
    observations: list[str]
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: list[dict[str, Any]]


class MiniSyncVec:
    """The vector contract in a few lines: env i seeded with seed + i; auto-reset with final_observation/final_info."""

    def __init__(self, envs: Sequence[TextEnvBase]) -> None:
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self.reset_seeds: list[int | None] = []

    def reset(
        self, *, seed: int | None = None, options: Sequence[dict[str, Any] | None] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        self.reset_seeds.append(seed)
        out = [
            env.reset(seed=None if seed is None else seed + i, options=None if options is None else options[i])
            for i, env in enumerate(self.envs)
        ]
        return [o for o, _ in out], [info for _, info in out]

    def step(self, actions: Sequence[str]) -> MiniStep:
        obs, rew, term, trunc, infos = [], [], [], [], []
        for env, a in zip(self.envs, actions, strict=True):
            o, r, te, tr, info = env.step(a)
            if te or tr:
                final_o, final_info = o, info
                o, info = env.reset()
                info = {**info, "final_observation": final_o, "final_info": final_info}
            obs.append(o)
            rew.append(r)
            term.append(te)
            trunc.append(tr)
            infos.append(info)
        return MiniStep(obs, np.array(rew, np.float32), np.array(term), np.array(trunc), infos)


class ScriptedAct:
    """Plays a fixed list of index vectors and records every call; logp = -(index + 1) / 2 to check the plumbing."""

    def __init__(self, script: Sequence[Sequence[int]]) -> None:
        self.script = [list(s) for s in script]
        self.calls: list[tuple[list[str], list[str], list[list[str]]]] = []

    def __call__(
        self, goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]
    ) -> ActOutput:
        assert torch.is_inference_mode_enabled()
        self.calls.append((list(goals), list(observations), [list(c) for c in candidates]))
        idx = torch.tensor(self.script[len(self.calls) - 1])
        return ActOutput(action=idx, logp=-(idx.float() + 1) / 2)


def make_pair(limit: int | None = 2) -> MiniSyncVec:
    return MiniSyncVec([CountEnv(["Reach 1", "Reach 2"], limit=limit), CountEnv(["Reach 2"], limit=limit)])


def test_text_steps_across_episode_boundary() -> None:
    act = ScriptedAct([[0, 1], [0, 1], [0, 0], [1, 1]])
    col = Collector(make_pair(), act, seed=7)

    s1, fin1 = col.step()
    # env 0: "Reach 1" reached at once -> terminal; next_* are the final state, not the auto-reset "pos 0".
    # env 1: "stay" -> nothing achieved.
    assert s1.goals == ["Reach 1", "Reach 2"]
    assert s1.observations == ["pos 0", "pos 0"]
    assert s1.candidates == [["go 1", "stay"], ["go 1", "stay"]]
    assert s1.actions == [0, 1]
    assert s1.logp == [-0.5, -1.0]
    assert s1.rewards == [1.0, 0.0]
    assert s1.terminated == [True, False]
    assert s1.truncated == [False, False]
    assert s1.next_observations == ["pos 1", "pos 0"]
    assert s1.next_candidates == [["go 2", "stay", "go 0"], ["go 1", "stay"]]
    assert s1.achieved_goals == [["Reach 1"], []]
    assert fin1 == [EpisodeStats("Reach 1", "near", True, 1, 1.0, env_index=0)]

    s2, fin2 = col.step()
    # env 0 now plays its new episode (goal "Reach 2" from the auto-reset); env 1 hits its limit of 2 -> truncated.
    assert s2.goals == ["Reach 2", "Reach 2"]
    assert s2.observations == ["pos 0", "pos 0"]
    assert s2.candidates == [["go 1", "stay"], ["go 1", "stay"]]
    assert s2.rewards == [0.0, 0.0]
    assert s2.terminated == [False, False]
    assert s2.truncated == [False, True]
    assert s2.next_observations == ["pos 1", "pos 0"]
    assert s2.next_candidates == [["go 2", "stay", "go 0"], ["go 1", "stay"]]
    assert s2.achieved_goals == [["Reach 1"], []]
    assert fin2 == [EpisodeStats("Reach 2", "far", False, 2, 0.0, env_index=1)]

    s3, fin3 = col.step()
    # env 0 reaches 2 on its 2nd step: terminated (not truncated) even though the step limit is also 2.
    assert s3.goals == ["Reach 2", "Reach 2"]
    assert s3.observations == ["pos 1", "pos 0"]
    assert s3.candidates == [["go 2", "stay", "go 0"], ["go 1", "stay"]]
    assert s3.actions == [0, 0]
    assert s3.rewards == [1.0, 0.0]
    assert s3.terminated == [True, False]
    assert s3.truncated == [False, False]
    assert s3.next_observations == ["pos 2", "pos 1"]
    assert s3.next_candidates == [["go 3", "stay", "go 1"], ["go 2", "stay", "go 0"]]
    assert s3.achieved_goals == [["Reach 2"], ["Reach 1"]]
    assert fin3 == [EpisodeStats("Reach 2", "far", True, 2, 1.0, env_index=0)]

    s4, fin4 = col.step()
    assert s4.goals == ["Reach 1", "Reach 2"]  # env 0's goal cycle went back to "Reach 1"
    assert s4.observations == ["pos 0", "pos 1"]
    # env 1's second episode: "go 1" then "stay" -> truncated at 2 steps with "Reach 1" achieved but not its goal.
    assert fin4 == [EpisodeStats("Reach 2", "far", False, 2, 0.0, env_index=1)]
    assert s4.next_observations == ["pos 0", "pos 1"]

    assert col.env_steps == 8
    assert col.episodes == 4
    # The act function saw exactly each state's admissible actions (and goals/observations), in env order.
    assert [c[2] for c in act.calls] == [s.candidates for s in (s1, s2, s3, s4)]
    assert [c[0] for c in act.calls] == [s.goals for s in (s1, s2, s3, s4)]
    assert [c[1] for c in act.calls] == [s.observations for s in (s1, s2, s3, s4)]


def test_first_step_resets_with_seed() -> None:
    vec = make_pair()
    Collector(vec, ScriptedAct([[0, 0]]), seed=11).step()
    assert vec.reset_seeds == [11]


def test_truncated_episode_needs_final_candidates() -> None:
    class NoCandsOnEnd(CountEnv):
        def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
            obs, r, te, tr, info = super().step(action)
            if te or tr:
                del info["admissible_actions"]
            return obs, r, te, tr, info

    # Terminated: candidates may be absent (never bootstrapped) -> [].
    col = Collector(MiniSyncVec([NoCandsOnEnd(["Reach 1"])]), ScriptedAct([[0]]), seed=0)
    step, _ = col.step()
    assert step.terminated == [True] and step.next_candidates == [[]]
    # Truncated: the critic bootstraps through it, so a missing list is an error naming the key.
    col = Collector(MiniSyncVec([NoCandsOnEnd(["Reach 2"], limit=1)]), ScriptedAct([[1]]), seed=0)
    with pytest.raises(KeyError, match="admissible_actions"):
        col.step()


def test_bad_index_names_env() -> None:
    col = Collector(make_pair(), ScriptedAct([[0, 2]]), seed=0)
    with pytest.raises(IndexError, match="env 1: act chose candidate index 2 but the state has 2 candidates"):
        col.step()


def test_env_verdict_overrides_reward() -> None:
    # verdict_key="won" reports the opposite of the reward rule: the collector must follow the env.
    vec = MiniSyncVec(
        [CountEnv(["Reach 1"], verdict_key="won"), CountEnv(["Reach 2"], limit=1, verdict_key="success")]
    )
    _, fin = Collector(vec, ScriptedAct([[0, 1]]), seed=0).step()
    assert [(e.goal, e.success) for e in fin] == [("Reach 1", False), ("Reach 2", True)]


def test_episode_success_rule() -> None:
    assert episode_success(1.0, True, {}) is True
    assert episode_success(0.5, True, {}) is True
    assert episode_success(0.0, True, {}) is False  # terminated by failure (e.g. a lost TextWorld game)
    assert episode_success(1.0, False, {}) is False  # truncated is never a success by the reward rule
    assert episode_success(0.0, False, {"won": True}) is True
    assert episode_success(1.0, True, {"won": False}) is False
    assert episode_success(1.0, True, {"success": False}) is False
    assert episode_success(1.0, True, {"won": None}) is True  # None = the env has no verdict


def test_episode_metrics() -> None:
    eps = [
        EpisodeStats("Reach 1", "near", True, 1, 1.0),
        EpisodeStats("Reach 2", "far", False, 3, 0.0),
        EpisodeStats("Reach 3", "far", True, 2, 1.0),
    ]
    m = episode_metrics(eps)
    assert m == {
        "charts/success": pytest.approx(2 / 3),
        "charts/episodic_return": pytest.approx(2 / 3),
        "charts/episodic_length": 2.0,
        "charts/success/far": 0.5,
        "charts/success/near": 1.0,
    }
    assert episode_metrics([]) == {}


def test_state_dict_resume() -> None:
    col = Collector(make_pair(), ScriptedAct([[0, 1], [0, 1], [0, 0]]), seed=5)
    for _ in range(3):
        col.step()
    state = col.state_dict()
    assert state["env_steps"] == 6 and state["episodes"] == 3
    assert state["observations"] == ["pos 0", "pos 1"]
    assert state["episode_length"] == [0, 1]

    vec = make_pair()
    col2 = Collector(vec, ScriptedAct([[1, 1]]), seed=999)
    col2.load_state_dict(state)
    col2.step()
    assert (col2.seed, col2.env_steps, col2.episodes) == (5, 8, 3)
    assert vec.reset_seeds == [5 + 6]  # fresh envs from seed + env_steps, not a replay of the first episodes


def test_with_vector_env_of_envs_package() -> None:
    """The same hand-checked step through helper C's SyncVectorTextEnv (the real vector contract)."""
    vector = pytest.importorskip("envs.vector")
    vec = vector.SyncVectorTextEnv(
        [lambda: CountEnv(["Reach 1", "Reach 2"], limit=2), lambda: CountEnv(["Reach 2"], limit=2)]
    )
    col = Collector(vec, ScriptedAct([[0, 1], [0, 1]]), seed=3)
    s1, fin1 = col.step()
    assert s1.next_observations == ["pos 1", "pos 0"]
    assert s1.next_candidates == [["go 2", "stay", "go 0"], ["go 1", "stay"]]
    assert s1.achieved_goals == [["Reach 1"], []]
    assert fin1 == [EpisodeStats("Reach 1", "near", True, 1, 1.0, env_index=0)]
    s2, fin2 = col.step()
    assert s2.goals == ["Reach 2", "Reach 2"] and s2.observations == ["pos 0", "pos 0"]
    assert fin2 == [EpisodeStats("Reach 2", "far", False, 2, 0.0, env_index=1)]
    vec.close()


def test_invariants_on_playground_text() -> None:
    """200 random vector steps of the real Playground-Text: next_* chain into the next step, rewards match goals."""
    vector = pytest.importorskip("envs.vector")
    pytest.importorskip("envs.playground_text")
    vec = vector.make_vector_env("sacglam/PlaygroundText-v0", 4)
    gen = torch.Generator().manual_seed(0)

    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        idx = [int(torch.randint(len(c), (1,), generator=gen)) for c in candidates]
        return ActOutput(action=torch.tensor(idx), logp=torch.full((len(idx),), -1.0))

    col = Collector(vec, act, seed=0)
    prev, fin0 = col.step()
    lengths, n_finished, n_success = sum(e.length for e in fin0), len(fin0), sum(e.success for e in fin0)
    for _ in range(199):
        cur, fin = col.step()
        for i in range(4):
            ended = prev.terminated[i] or prev.truncated[i]
            if not ended:  # the state reached is the next state acted in, in the same episode
                assert cur.observations[i] == prev.next_observations[i]
                assert cur.candidates[i] == prev.next_candidates[i]
                assert cur.goals[i] == prev.goals[i]
            assert (prev.rewards[i] > 0) == (prev.goals[i] in prev.achieved_goals[i])
            assert prev.terminated[i] == (prev.rewards[i] > 0)
        lengths += sum(e.length for e in fin)
        n_finished += len(fin)
        n_success += sum(e.success for e in fin)
        for e in fin:
            assert e.success == (e.return_ > 0)
        prev = cur
    vec.close()
    assert col.env_steps == 800 and col.episodes == n_finished
    # Every env step belongs to exactly one episode: finished ones plus those still running.
    assert lengths + sum(col.state_dict()["episode_length"]) == 800
    assert n_finished > 50 and 0 < n_success < n_finished  # random play solves some grasp goals only


def test_exact_resume_with_restored_envs() -> None:
    """Collector + vector-env state saved mid-episode: a restored pair yields exactly the same next TextSteps."""
    from envs.vector import make_vector_env

    def seeded_act(seed: int) -> Any:
        gen = torch.Generator().manual_seed(seed)

        def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
            idx = [int(torch.randint(len(c), (1,), generator=gen)) for c in candidates]
            return ActOutput(action=torch.tensor(idx), logp=torch.zeros(len(idx)))

        return act

    kwargs = {"goal_categories": ["grasp", "grow_plant"]}
    ref_env = make_vector_env("sacglam/PlaygroundText-v0", 3, env_kwargs=kwargs)
    ref = Collector(ref_env, seeded_act(0), seed=11)
    for _ in range(5):
        ref.step()
    saved, saved_envs = ref.state_dict(), ref_env.get_state()
    ref.act = seeded_act(1)
    expected = [ref.step() for _ in range(20)]

    new_env = make_vector_env("sacglam/PlaygroundText-v0", 3, env_kwargs=kwargs)
    new = Collector(new_env, seeded_act(1), seed=0)
    new_env.set_state(saved_envs)
    new.load_state_dict(saved, envs_restored=True)
    got = [new.step() for _ in range(20)]
    assert got == expected
    assert sum(len(f) for _, f in got) > 0  # episodes finished after the resume, with their pre-resume lengths
    assert new.env_steps == ref.env_steps
