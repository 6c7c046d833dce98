"""The episode player: N text envs stepped together with a policy, one vector step at a time.

Three loops play episodes with it: the training collector (``sacglam.collector``) steps all N envs, the vector env
auto-resetting a finished one; the evaluation (``sacglam.evaluate``) and ETO's expert and policy play
(``sacglam.algos.eto.rollout``) play tasks to their end in waves (``sacglam.waves``), a finished env idling until its
wave ends.

    player = Player(vec_env)
    player.reset(seed=0)
    step = player.step(act)          # one PlayedStep of the N envs
    step = player.step(act, [0, 2])  # envs 0 and 2 act, the others idle

This module imports neither the agent, the learners, the replay buffer nor ``envs``: the envs come in typed by the
``VectorTextEnv`` Protocol below (``envs.vector.SyncVectorTextEnv`` / ``SubprocVectorTextEnv`` and
``sacglam.waves.EnvList`` satisfy it), and the policy as an ``ActFn`` (docs/design/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sacglam.types import ActFn


class VectorStepLike(Protocol):
    """What ``VectorTextEnv.step`` returns (``envs.vector.VectorStepResult``).

    Finished envs are auto-reset: ``observations[i]``/``infos[i]`` are the new episode's, and
    ``infos[i]["final_observation"]`` / ``infos[i]["final_info"]`` hold the finished episode's last ones.
    """

    observations: list[str]
    rewards: np.ndarray  # [N] float32
    terminated: np.ndarray  # [N] bool
    truncated: np.ndarray  # [N] bool
    infos: list[dict[str, Any]]


class VectorTextEnv(Protocol):
    """The vector-env contract of ``envs/vector.py``: N text envs stepped together, with auto-reset."""

    @property
    def num_envs(self) -> int: ...

    def reset(
        self, *, seed: int | None = None, options: Sequence[dict[str, Any] | None] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]: ...

    def step(self, actions: Sequence[str]) -> VectorStepLike: ...


def episode_success(reward: float, terminated: bool, final_info: Mapping[str, Any]) -> bool:
    """Whether an episode that just ended succeeded.

    The env's own verdict wins when it gives one: ``final_info["won"]`` (TextWorld's name) or else
    ``final_info["success"]``. Otherwise success means the last step was *terminated* with a positive reward: in every
    env of this project reaching the goal pays 1 and terminates, while a time limit truncates (never a success) --
    a rule that also holds for BabyAI's ``1 - 0.9 t / T`` reward, which is positive on success only.

    Args:
        reward: reward of the episode's last step.
        terminated: whether that step terminated (as opposed to truncated) the episode.
        final_info: the info of the last step.
    """
    for key in ("won", "success"):
        if key in final_info and final_info[key] is not None:
            return bool(final_info[key])
    return bool(terminated) and reward > 0


def info_field(info: Mapping[str, Any], key: str, env_index: int, where: str) -> Any:
    """``info[key]``, with an error that names the env and the contract when the env does not provide it.

    Args:
        info: an env's info dict.
        key: the field to read.
        env_index: the env's index, for the message.
        where: which info it is (``"current"``, ``"step"``, ``"auto-reset"``, ``"final"``), for the message.

    Raises:
        KeyError: ``key`` is missing.
    """
    try:
        return info[key]
    except KeyError:
        raise KeyError(
            f"env {env_index}: {where} info has no {key!r} (keys: {sorted(info)}); every env must fill "
            f"info['goal'], info['goal_category'], info['admissible_actions'] and info['achieved_goals'] "
            f"(see envs/base.py and docs/design/ENVIRONMENTS.md)"
        ) from None


@dataclass
class PlayedStep:
    """One step of the K acting envs ``envs`` (of the N); every list has length K, in that order.

    ``last_observations`` / ``last_infos`` are the state reached: for an env whose episode ended (terminated or
    truncated) the episode's real last one (``final_observation`` / ``final_info``), not the auto-reset episode's.
    ``lengths`` / ``returns`` are the env's running episode's length and undiscounted return after this step.
    """

    envs: list[int]
    goals: list[str]
    categories: list[str]
    observations: list[str]
    candidates: list[list[str]]
    actions: list[int]
    logp: list[float]
    rewards: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    last_observations: list[str] = field(default_factory=list)
    last_infos: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)

    def ended(self, k: int) -> bool:
        """Whether the episode of the k-th acting env ended at this step."""
        return self.terminated[k] or self.truncated[k]


class Player:
    """N envs stepped together with a policy; it keeps their current states and their running episodes' counters.

    Attributes:
        envs: the vector env (or ``sacglam.waves.EnvList``).
        num_envs: N.
        observations, infos: the N current states (None before the first reset).
        episode_return: [N] float64, the running episodes' undiscounted returns.
        episode_length: [N] int64, the running episodes' lengths.
    """

    def __init__(self, envs: VectorTextEnv) -> None:
        self.envs = envs
        self.num_envs = int(envs.num_envs)
        self.observations: list[str] | None = None
        self.infos: list[dict[str, Any]] | None = None
        self.episode_return = np.zeros(self.num_envs, dtype=np.float64)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, *, seed: int | None, options: Sequence[dict[str, Any] | None] | None = None) -> None:
        """Reset all envs (env i with ``seed + i``); running episodes are dropped."""
        obs, infos = self.envs.reset(seed=seed, options=options)
        self.set_state(obs, infos)

    def set_state(self, obs: Sequence[str], infos: Sequence[dict[str, Any]]) -> None:
        """Take the N envs' states after a reset done outside (``EnvList.reset_tasks``); running episodes restart.

        Raises:
            ValueError: not N observations and N infos.
        """
        if len(obs) != self.num_envs or len(infos) != self.num_envs:
            raise ValueError(
                f"vector env reset returned {len(obs)} observations and {len(infos)} infos for "
                f"num_envs={self.num_envs}"
            )
        self.observations, self.infos = list(obs), list(infos)
        self.episode_return[:] = 0.0
        self.episode_length[:] = 0

    def step(self, act: ActFn | None, acting: Sequence[int] | None = None) -> PlayedStep:
        """Take one vector step: the acting envs play the policy's actions, the others idle.

        Reads the acting envs' goals, observations and admissible actions from their current infos, calls ``act``
        once for all of them under ``torch.inference_mode``, maps the chosen indices to action strings and steps the
        envs. An idle env (a vector env's finished one, running on in its auto-reset episode) takes its first
        admissible action, and its step is ignored.

        Args:
            act: the policy, ``(goals, observations, candidates) -> ActOutput(action [K] long, logp [K] float)``;
                None plays the expert: the envs' ``expert_action(i)`` (``sacglam.waves.EnvList`` has it), with
                log-probability 0.
            acting: the acting envs' indices, ascending; None: all N.

        Raises:
            RuntimeError: no reset yet.
            ValueError: ``act`` returned the wrong number of actions or log-probabilities.
            IndexError: ``act`` chose an index outside an env's candidate list (names the env and the list size).
        """
        if self.observations is None or self.infos is None:
            raise RuntimeError("Player.step before reset")
        infos = self.infos
        envs = list(range(self.num_envs)) if acting is None else list(acting)
        goals = [str(info_field(infos[i], "goal", i, "current")) for i in envs]
        categories = [str(info_field(infos[i], "goal_category", i, "current")) for i in envs]
        candidates = [list(info_field(infos[i], "admissible_actions", i, "current")) for i in envs]
        observations = [self.observations[i] for i in envs]
        actions, logp = self._choose(act, envs, goals, observations, candidates)
        # An idle env runs on with any admissible action; it is ignored.
        strings = [(info.get("admissible_actions") or [""])[0] for info in infos]
        for i, a, cands in zip(envs, actions, candidates, strict=True):
            strings[i] = cands[a]
        res = self.envs.step(strings)
        played = PlayedStep(envs, goals, categories, observations, candidates, actions, logp)
        self._record(res, played)
        self.observations = [str(o) for o in res.observations]
        self.infos = list(res.infos)
        return played

    def _choose(
        self,
        act: ActFn | None,
        envs: Sequence[int],
        goals: list[str],
        observations: list[str],
        candidates: list[list[str]],
    ) -> tuple[list[int], list[float]]:
        """The acting envs' chosen candidate indices and their log-probabilities, checked against the candidates."""
        if act is None:
            expert = getattr(self.envs, "expert_action", None)  # EnvList.expert_action(i)
            if expert is None:
                raise TypeError(f"expert play (act=None) needs envs with expert_action(i), not {type(self.envs)}")
            actions = [cands.index(expert(i)) for i, cands in zip(envs, candidates, strict=True)]
            logp = [0.0] * len(actions)
        else:
            with torch.inference_mode():
                out = act(goals, observations, candidates)
            # ActOutput tensors are on CPU by contract; .tolist() is the one conversion per step.
            actions = [int(a) for a in out.action.reshape(-1).tolist()]
            logp = [float(x) for x in out.logp.reshape(-1).tolist()]
        if len(actions) != len(envs) or len(logp) != len(envs):
            raise ValueError(f"act returned {len(actions)} actions and {len(logp)} log-probs for {len(envs)} envs")
        for i, a, cands in zip(envs, actions, candidates, strict=True):
            if not 0 <= a < len(cands):
                raise IndexError(
                    f"env {i}: act chose candidate index {a} but the state has {len(cands)} candidates {cands} "
                    f"(action {a} outside [0, {len(cands)}))"
                )
        return actions, logp

    def _record(self, res: VectorStepLike, played: PlayedStep) -> None:
        """Fill ``played``'s step results from the vector step ``res`` and advance the running episodes."""
        rewards = np.asarray(res.rewards).reshape(-1)
        terminated = np.asarray(res.terminated).reshape(-1)
        truncated = np.asarray(res.truncated).reshape(-1)
        for i in played.envs:
            reward, term, trunc, info = float(rewards[i]), bool(terminated[i]), bool(truncated[i]), res.infos[i]
            self.episode_return[i] += reward
            self.episode_length[i] += 1
            played.rewards.append(reward)
            played.terminated.append(term)
            played.truncated.append(trunc)
            played.lengths.append(int(self.episode_length[i]))
            played.returns.append(float(self.episode_return[i]))
            if term or trunc:
                played.last_observations.append(str(info_field(info, "final_observation", i, "auto-reset")))
                played.last_infos.append(info_field(info, "final_info", i, "auto-reset"))
                self.episode_return[i] = 0.0
                self.episode_length[i] = 0
            else:
                played.last_observations.append(str(res.observations[i]))
                played.last_infos.append(info)


__all__ = ["PlayedStep", "Player", "VectorStepLike", "VectorTextEnv", "episode_success", "info_field"]
