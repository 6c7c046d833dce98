"""Step a batch of text environments with an act function and emit one ``TextStep`` per vector step.

The collector is the only place where the environments meet the policy, and it sees the policy only as an
``ActFn`` (``(goals, observations, candidates) -> ActOutput``): it imports neither the agent, the SAC updater nor the
buffer (docs/design/ARCHITECTURE.md), and never imports ``envs`` -- the vector env comes in as an argument typed by the
``VectorTextEnv`` Protocol below (``envs.vector.SyncVectorTextEnv`` / ``SubprocVectorTextEnv`` satisfy it).

n-step returns are **not** computed here: the buffer computes them at sample time, so that HER can recompute them
for relabelled goals. The collector emits raw one-step transitions only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sacglam.types import ActFn, TextStep


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


@dataclass
class EpisodeStats:
    """Summary of one finished training episode.

    Attributes:
        goal: the episode's goal text.
        goal_category: its category (``info["goal_category"]``).
        success: see ``episode_success``.
        length: number of env steps in the episode.
        return_: undiscounted sum of rewards.
        env_index: which of the N envs ran it.
    """

    goal: str
    goal_category: str
    success: bool
    length: int
    return_: float
    env_index: int = 0


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


def episode_metrics(episodes: Sequence[EpisodeStats]) -> dict[str, float]:
    """CleanRL-style training metrics over finished episodes (empty dict when there are none).

    Returns ``charts/success``, ``charts/episodic_return``, ``charts/episodic_length`` (means) and
    ``charts/success/<category>`` per goal category present.
    """
    if not episodes:
        return {}
    out = {
        "charts/success": float(np.mean([e.success for e in episodes])),
        "charts/episodic_return": float(np.mean([e.return_ for e in episodes])),
        "charts/episodic_length": float(np.mean([e.length for e in episodes])),
    }
    for cat in sorted({e.goal_category for e in episodes}):
        out[f"charts/success/{cat}"] = float(np.mean([e.success for e in episodes if e.goal_category == cat]))
    return out


def _info_field(info: Mapping[str, Any], key: str, env_index: int, where: str) -> Any:
    """``info[key]`` with an error that names the env and the contract when the env does not provide it."""
    try:
        return info[key]
    except KeyError:
        raise KeyError(
            f"env {env_index}: {where} info has no {key!r} (keys: {sorted(info)}); every env must fill "
            f"info['goal'], info['goal_category'], info['admissible_actions'] and info['achieved_goals'] "
            f"(see envs/base.py and docs/design/ENVIRONMENTS.md)"
        ) from None


class Collector:
    """Runs N envs with an act function, one vector step at a time.

    Example::

        collector = Collector(vec_env, act, seed=0)
        step, finished = collector.step()   # TextStep of N transitions, EpisodeStats of episodes that ended

    The envs are reset lazily on the first ``step`` (env i seeded with ``seed + i``) and then auto-reset by the
    vector env. Each ``step``:

    1. reads the goals, observations and admissible actions from the current infos;
    2. calls ``act`` once for all N states under ``torch.inference_mode``;
    3. maps the chosen indices to action strings and steps the vector env;
    4. fills ``TextStep`` with ``next_observations`` / ``next_candidates`` / ``achieved_goals`` of the state reached:
       for an env whose episode ended (terminated or truncated) they come from ``final_observation`` /
       ``final_info`` (the real last state, as CleanRL does for truncation), not from the auto-reset episode.

    n-step returns are not computed here: the buffer computes them at sample time, so that HER can recompute them for
    relabelled goals.

    Attributes:
        env_steps: total env steps taken (N per ``step``).
        episodes: total episodes finished.
    """

    def __init__(self, envs: VectorTextEnv, act: ActFn, *, seed: int) -> None:
        """Wrap a vector env; nothing is reset until the first ``step``.

        Args:
            envs: the vector env (``envs.vector.make_vector_env(...)`` or anything with its interface).
            act: the policy, ``(goals, observations, candidates) -> ActOutput(action [N] long, logp [N] float)``.
            seed: env i is reset with ``seed + i`` on the first step.
        """
        self.envs = envs
        self.act = act
        self.seed = seed
        self.num_envs = int(envs.num_envs)
        self.env_steps = 0
        self.episodes = 0
        self._reset_seed: int | None = seed
        self._obs: list[str] | None = None
        self._infos: list[dict[str, Any]] | None = None
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._ep_length = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, seed: int | None = None) -> tuple[list[str], list[dict[str, Any]]]:
        """Reset all envs now (env i with ``seed + i``; the pending reset seed when ``seed`` is None).

        Episodes in progress are dropped without ``EpisodeStats``.
        """
        obs, infos = self.envs.reset(seed=self._reset_seed if seed is None else seed)
        if len(obs) != self.num_envs or len(infos) != self.num_envs:
            raise ValueError(
                f"vector env reset returned {len(obs)} observations and {len(infos)} infos for "
                f"num_envs={self.num_envs}"
            )
        self._obs, self._infos = list(obs), list(infos)
        self._reset_seed = None  # later resets come from the vector env's own auto-reset
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        return self._obs, self._infos

    def step(self) -> tuple[TextStep, list[EpisodeStats]]:
        """Take one vector step with the act function.

        Returns:
            The N transitions as a ``TextStep`` (lists of length N) and the ``EpisodeStats`` of the episodes that
            ended at this step (in env order).

        Raises:
            IndexError: ``act`` chose an index outside an env's candidate list (names the env and the list size).
        """
        if self._obs is None or self._infos is None:
            self.reset()
        assert self._obs is not None and self._infos is not None
        n = self.num_envs
        observations = self._obs
        infos = self._infos
        goals = [str(_info_field(info, "goal", i, "current")) for i, info in enumerate(infos)]
        categories = [str(_info_field(info, "goal_category", i, "current")) for i, info in enumerate(infos)]
        candidates = [list(_info_field(info, "admissible_actions", i, "current")) for i, info in enumerate(infos)]

        with torch.inference_mode():
            out = self.act(goals, observations, candidates)
        # ActOutput tensors are on CPU by contract; .tolist() is the one conversion per step.
        actions = [int(a) for a in out.action.reshape(-1).tolist()]
        logp = [float(x) for x in out.logp.reshape(-1).tolist()]
        if len(actions) != n or len(logp) != n:
            raise ValueError(f"act returned {len(actions)} actions and {len(logp)} log-probs for {n} envs")
        action_strings = []
        for i, (a, cands) in enumerate(zip(actions, candidates, strict=True)):
            if not 0 <= a < len(cands):
                raise IndexError(
                    f"env {i}: act chose candidate index {a} but the state has {len(cands)} candidates {cands}"
                )
            action_strings.append(cands[a])

        res = self.envs.step(action_strings)
        rewards = [float(r) for r in np.asarray(res.rewards).reshape(-1)]
        terminated = [bool(t) for t in np.asarray(res.terminated).reshape(-1)]
        truncated = [bool(t) for t in np.asarray(res.truncated).reshape(-1)]

        next_observations: list[str] = []
        next_candidates: list[list[str]] = []
        achieved_goals: list[list[str]] = []
        finished: list[EpisodeStats] = []
        for i in range(n):
            info = res.infos[i]
            self._ep_return[i] += rewards[i]
            self._ep_length[i] += 1
            if terminated[i] or truncated[i]:
                last_obs = str(_info_field(info, "final_observation", i, "auto-reset"))
                last_info = _info_field(info, "final_info", i, "auto-reset")
                # A terminal state's candidates are never bootstrapped through, so the env may leave them out.
                if terminated[i]:
                    cands = last_info.get("admissible_actions", [])
                else:  # truncated: the critic bootstraps through this state, so its candidates are required
                    cands = _info_field(last_info, "admissible_actions", i, "final")
                next_observations.append(last_obs)
                next_candidates.append(list(cands))
                achieved_goals.append(list(_info_field(last_info, "achieved_goals", i, "final")))
                finished.append(
                    EpisodeStats(
                        goal=goals[i],
                        goal_category=categories[i],
                        success=episode_success(rewards[i], terminated[i], last_info),
                        length=int(self._ep_length[i]),
                        return_=float(self._ep_return[i]),
                        env_index=i,
                    )
                )
                self._ep_return[i] = 0.0
                self._ep_length[i] = 0
            else:
                next_observations.append(str(res.observations[i]))
                next_candidates.append(list(_info_field(info, "admissible_actions", i, "step")))
                achieved_goals.append(list(_info_field(info, "achieved_goals", i, "step")))

        self.env_steps += n
        self.episodes += len(finished)
        self._obs = [str(o) for o in res.observations]
        self._infos = list(res.infos)
        step = TextStep(
            goals=goals,
            observations=list(observations),
            candidates=candidates,
            actions=actions,
            logp=logp,
            rewards=rewards,
            terminated=terminated,
            truncated=truncated,
            next_observations=next_observations,
            next_candidates=next_candidates,
            achieved_goals=achieved_goals,
        )
        return step, finished

    def state_dict(self) -> dict[str, Any]:
        """Counters, the current (pre-step) observations and infos, and the running episodes' returns and lengths.

        Together with the vector env's own state (``envs.get_state()``, where the envs can be pickled) this resumes
        exactly; without it, ``load_state_dict`` restarts the envs from a fresh seed.
        """
        return {
            "seed": self.seed,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "reset_seed": self._reset_seed,
            "observations": None if self._obs is None else list(self._obs),
            "infos": None if self._infos is None else list(self._infos),
            "episode_return": self._ep_return.tolist(),
            "episode_length": self._ep_length.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, envs_restored: bool = False) -> None:
        """Restore the collector.

        Args:
            state: a ``state_dict()``.
            envs_restored: the vector env was restored to the same moment (``envs.set_state``): keep the saved
                observations, infos and running episodes, so that the run continues exactly. Otherwise the envs are
                reset on the next ``step`` with seed ``seed + env_steps`` (so a resumed run does not replay the
                episodes it started with); episodes in progress at save time are then dropped without
                ``EpisodeStats`` and their stored transitions end without a terminal flag.
        """
        self.seed = int(state["seed"])
        self.env_steps = int(state["env_steps"])
        self.episodes = int(state["episodes"])
        if envs_restored and state.get("infos") is not None:
            self._reset_seed = state.get("reset_seed")
            self._obs = list(state["observations"])
            self._infos = list(state["infos"])
            self._ep_return[:] = np.asarray(state["episode_return"], dtype=np.float64)
            self._ep_length[:] = np.asarray(state["episode_length"], dtype=np.int64)
            return
        self._reset_seed = self.seed + self.env_steps
        self._obs = None
        self._infos = None
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
