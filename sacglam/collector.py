"""Step a batch of text environments with an act function and emit one ``TextStep`` per vector step.

The collector is the training side of the episode player (``sacglam.player``, which also serves the evaluation and
ETO's exploration): it steps all N envs with the player, the vector env auto-resetting a finished one, and turns each
vector step into a ``TextStep`` of transitions and the ``EpisodeStats`` of the episodes that ended. It sees the policy
only as an ``ActFn`` (``(goals, observations, candidates) -> ActOutput``): it imports neither the agent, the SAC
updater nor the buffer (docs/design/ARCHITECTURE.md), and never imports ``envs`` -- the vector env comes in as an
argument typed by the ``VectorTextEnv`` Protocol (defined in ``sacglam.player``, re-exported here;
``envs.vector.SyncVectorTextEnv`` / ``SubprocVectorTextEnv`` satisfy it).

n-step returns are **not** computed here: the buffer computes them at sample time, so that HER can recompute them
for relabelled goals. The collector emits raw one-step transitions only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sacglam.player import PlayedStep, Player, VectorStepLike, VectorTextEnv, episode_success, info_field
from sacglam.types import ActFn, TextStep


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
        self.player = Player(envs)
        self.num_envs = self.player.num_envs
        self.env_steps = 0
        self.episodes = 0
        self._reset_seed: int | None = seed

    def reset(self, seed: int | None = None) -> tuple[list[str], list[dict[str, Any]]]:
        """Reset all envs now (env i with ``seed + i``; the pending reset seed when ``seed`` is None).

        Episodes in progress are dropped without ``EpisodeStats``.
        """
        self.player.reset(seed=self._reset_seed if seed is None else seed)
        self._reset_seed = None  # later resets come from the vector env's own auto-reset
        assert self.player.observations is not None and self.player.infos is not None
        return self.player.observations, self.player.infos

    def step(self) -> tuple[TextStep, list[EpisodeStats]]:
        """Take one vector step with the act function.

        Returns:
            The N transitions as a ``TextStep`` (lists of length N) and the ``EpisodeStats`` of the episodes that
            ended at this step (in env order).

        Raises:
            IndexError: ``act`` chose an index outside an env's candidate list (names the env and the list size).
            KeyError: an info lacks a field of the env contract (names the env and the field).
        """
        if self.player.infos is None:
            self.reset()
        played = self.player.step(self.act)
        next_candidates: list[list[str]] = []
        achieved_goals: list[list[str]] = []
        finished: list[EpisodeStats] = []
        for k, i in enumerate(played.envs):
            cands, achieved = _next_state(played, k)
            next_candidates.append(cands)
            achieved_goals.append(achieved)
            if played.ended(k):
                finished.append(
                    EpisodeStats(
                        goal=played.goals[k],
                        goal_category=played.categories[k],
                        success=episode_success(played.rewards[k], played.terminated[k], played.last_infos[k]),
                        length=played.lengths[k],
                        return_=played.returns[k],
                        env_index=i,
                    )
                )
        self.env_steps += self.num_envs
        self.episodes += len(finished)
        step = TextStep(
            goals=played.goals,
            observations=played.observations,
            candidates=played.candidates,
            actions=played.actions,
            logp=played.logp,
            rewards=played.rewards,
            terminated=played.terminated,
            truncated=played.truncated,
            next_observations=played.last_observations,
            next_candidates=next_candidates,
            achieved_goals=achieved_goals,
        )
        return step, finished

    def state_dict(self) -> dict[str, Any]:
        """Counters, the current (pre-step) observations and infos, and the running episodes' returns and lengths.

        Together with the vector env's own state (``envs.get_state()``, where the envs can be pickled) this resumes
        exactly; without it, ``load_state_dict`` restarts the envs from a fresh seed.
        """
        player = self.player
        return {
            "seed": self.seed,
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "reset_seed": self._reset_seed,
            "observations": None if player.observations is None else list(player.observations),
            "infos": None if player.infos is None else list(player.infos),
            "episode_return": player.episode_return.tolist(),
            "episode_length": player.episode_length.tolist(),
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
        player = self.player
        if envs_restored and state.get("infos") is not None:
            self._reset_seed = state.get("reset_seed")
            player.observations = list(state["observations"])
            player.infos = list(state["infos"])
            player.episode_return[:] = np.asarray(state["episode_return"], dtype=np.float64)
            player.episode_length[:] = np.asarray(state["episode_length"], dtype=np.int64)
            return
        self._reset_seed = self.seed + self.env_steps
        player.observations = None
        player.infos = None
        player.episode_return[:] = 0.0
        player.episode_length[:] = 0


def _next_state(played: PlayedStep, k: int) -> tuple[list[str], list[str]]:
    """The candidates and newly achieved goals of the state the k-th env reached (its episode's last when it ended).

    A terminal state's candidates are never bootstrapped through, so the env may leave them out (``[]``); a truncated
    or running episode's state is bootstrapped through, so its candidates are required.
    """
    i, info = played.envs[k], played.last_infos[k]
    if played.terminated[k]:
        cands = info.get("admissible_actions", [])
    else:
        cands = info_field(info, "admissible_actions", i, "final" if played.truncated[k] else "step")
    achieved = info_field(info, "achieved_goals", i, "final" if played.ended(k) else "step")
    return list(cands), list(achieved)


__all__ = ["Collector", "EpisodeStats", "VectorStepLike", "VectorTextEnv", "episode_metrics", "episode_success"]
