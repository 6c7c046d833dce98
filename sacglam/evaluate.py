"""Evaluation rollouts per goal category, on held-out seeds, with the act function batched across envs.

    metrics = evaluate(env_fns, act_greedy, act_sample, categories=["grasp", "grow_plant"],
                       episodes_per_category=50, seed=10_000)
    metrics["eval/greedy/success/grasp"], metrics["eval/greedy/success"], metrics["eval/sample/length/grasp"], ...

Episode ``j`` of the plan (categories in the given order, ``episodes_per_category`` each) is reset with seed
``seed + j`` and ``options={"goal_category": c}``, whatever the number of envs, so results depend only on the seed and
the act functions. Greedy and sampled evaluation run the same episodes. Like the collector, this module never
imports ``envs``: environments come in as factories or as a vector env.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sacglam.collector import VectorTextEnv, episode_success
from sacglam.types import ActFn, TextEnv


@dataclass
class _Step:
    """A ``VectorStepLike`` for ``_EnvList``."""

    observations: list[str]
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: list[dict[str, Any]]


class _EnvList:
    """Plain envs behind the vector interface, without auto-reset: a finished env is not stepped again.

    Its ``step`` result carries ``final_observation`` / ``final_info`` for an env that just finished, like the vector
    env, so the evaluation loop reads both the same way.
    """

    def __init__(self, envs: Sequence[TextEnv]) -> None:
        self.envs = list(envs)
        self.num_envs = len(self.envs)
        self._done = [True] * self.num_envs
        self._obs: list[str] = [""] * self.num_envs
        self._infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]

    def reset(
        self, *, seed: int | None = None, options: Sequence[dict[str, Any] | None] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        for i, env in enumerate(self.envs):
            env_seed = None if seed is None else seed + i
            self._obs[i], self._infos[i] = env.reset(seed=env_seed, options=None if options is None else options[i])
            self._done[i] = False
        return list(self._obs), list(self._infos)

    def step(self, actions: Sequence[str]) -> _Step:
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        for i, env in enumerate(self.envs):
            if self._done[i]:
                continue  # the caller ignores finished envs; stepping them would raise in most envs
            obs, reward, term, trunc, info = env.step(actions[i])
            rewards[i], terminated[i], truncated[i] = reward, term, trunc
            if term or trunc:
                info = {**info, "final_observation": obs, "final_info": info}
                self._done[i] = True
            self._obs[i], self._infos[i] = obs, info
        return _Step(list(self._obs), rewards, terminated, truncated, list(self._infos))

    def close(self) -> None:
        for env in self.envs:
            close = getattr(env, "close", None)
            if close is not None:
                close()


def _is_vector_env(envs: object) -> bool:
    return hasattr(envs, "num_envs") and hasattr(envs, "step") and hasattr(envs, "reset")


def _run_episodes(
    vec: VectorTextEnv | _EnvList,
    act: ActFn,
    plan: Sequence[str],
    seed: int,
    max_steps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run one episode per entry of ``plan`` (a goal category each) in waves of ``num_envs``.

    Returns:
        success [E] bool, length [E] int, return [E] float, in plan order.
    """
    n_envs = int(vec.num_envs)
    n_ep = len(plan)
    success = np.zeros(n_ep, dtype=bool)
    length = np.zeros(n_ep, dtype=np.int64)
    ret = np.zeros(n_ep, dtype=np.float64)
    for start in range(0, n_ep, n_envs):
        count = min(n_envs, n_ep - start)
        # Envs past the end of the plan in the last wave still need a reset (vector envs reset all); they are ignored.
        cats = [plan[min(start + i, n_ep - 1)] for i in range(n_envs)]
        obs, infos = vec.reset(seed=seed + start, options=[{"goal_category": c} for c in cats])
        for i in range(count):
            got = infos[i].get("goal_category")
            if got != cats[i]:
                raise ValueError(
                    f"env {i}: reset(options={{'goal_category': {cats[i]!r}}}) gave goal {infos[i].get('goal')!r} "
                    f"of category {got!r}; the env must honour the goal_category option"
                )
        active = np.arange(n_envs) < count
        for _ in range(max_steps):
            idx: list[int] = np.flatnonzero(active).tolist()
            if not idx:
                break
            cands = [list(infos[i]["admissible_actions"]) for i in idx]
            with torch.inference_mode():
                out = act([str(infos[i]["goal"]) for i in idx], [obs[i] for i in idx], cands)
            chosen = out.action.reshape(-1).tolist()
            if len(chosen) != len(idx):
                raise ValueError(f"act returned {len(chosen)} actions for {len(idx)} states")
            # Finished vector envs run on in their auto-reset episode; any admissible action does, and is ignored.
            actions = [(info.get("admissible_actions") or [""])[0] for info in infos]
            for k, i in enumerate(idx):
                a = int(chosen[k])
                if not 0 <= a < len(cands[k]):
                    raise IndexError(f"env {i}: act chose candidate {a} of {len(cands[k])} candidates {cands[k]}")
                actions[i] = cands[k][a]
            res = vec.step(actions)
            for i in idx:
                e = start + i
                reward = float(res.rewards[i])
                length[e] += 1
                ret[e] += reward
                term, trunc = bool(res.terminated[i]), bool(res.truncated[i])
                if term or trunc:
                    success[e] = episode_success(reward, term, res.infos[i]["final_info"])
                    active[i] = False
            obs, infos = list(res.observations), list(res.infos)
        else:
            if active.any():
                raise RuntimeError(
                    f"evaluation episodes {[start + int(i) for i in np.flatnonzero(active)]} did not end within "
                    f"max_steps={max_steps}; the env should truncate at its step limit (or raise max_steps)"
                )
    return success, length, ret


def evaluate(
    envs: VectorTextEnv | Sequence[Callable[[], TextEnv]],
    act_greedy: ActFn,
    act_sample: ActFn | None = None,
    *,
    categories: Sequence[str],
    episodes_per_category: int,
    seed: int,
    max_steps: int = 10_000,
) -> dict[str, float]:
    """Success rate and episode length per goal category, greedy (and optionally sampled) actions.

    Args:
        envs: a vector env (reset in waves; a finished env idles until the wave ends) or a list of env factories
            (built here, stepped without auto-reset, closed at the end). Their number is the act batch size.
        act_greedy: the greedy policy, ``(goals, observations, candidates) -> ActOutput``.
        act_sample: the sampling policy, or None. It must draw from a generator the caller seeds, for the result to
            be deterministic.
        categories: goal categories to evaluate, each passed as ``reset(options={"goal_category": c})``.
        episodes_per_category: episodes per category (same episodes for greedy and sample).
        seed: episode ``j`` of the plan uses env seed ``seed + j``; use seeds disjoint from training's.
        max_steps: safety bound on steps per wave (an env that never ends raises instead of hanging).

    Returns:
        ``eval/<mode>/success/<cat>``, ``eval/<mode>/length/<cat>``, ``eval/<mode>/return/<cat>`` and the means over
        categories ``eval/<mode>/success``, ``eval/<mode>/length``, for mode ``greedy`` (and ``sample``).
    """
    if not categories:
        raise ValueError("evaluate needs at least one goal category (e.g. categories=env.goal_categories)")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories has duplicates: {list(categories)}")
    if episodes_per_category < 1:
        raise ValueError(f"episodes_per_category must be >= 1, got {episodes_per_category}")
    plan = [c for c in categories for _ in range(episodes_per_category)]
    owned: _EnvList | None = None
    if _is_vector_env(envs):
        vec: VectorTextEnv | _EnvList = envs  # type: ignore[assignment]
    else:
        fns = list(envs)  # type: ignore[arg-type]
        if not fns:
            raise ValueError("evaluate got an empty list of env factories")
        owned = vec = _EnvList([fn() for fn in fns])
    modes: list[tuple[str, ActFn]] = [("greedy", act_greedy)]
    if act_sample is not None:
        modes.append(("sample", act_sample))
    metrics: dict[str, float] = {}
    try:
        for mode, act in modes:
            success, length, ret = _run_episodes(vec, act, plan, seed, max_steps)
            cats = np.array(plan)
            per_cat_success = []
            per_cat_length = []
            for c in categories:
                sel = cats == c
                per_cat_success.append(float(success[sel].mean()))
                per_cat_length.append(float(length[sel].mean()))
                metrics[f"eval/{mode}/success/{c}"] = per_cat_success[-1]
                metrics[f"eval/{mode}/length/{c}"] = per_cat_length[-1]
                metrics[f"eval/{mode}/return/{c}"] = float(ret[sel].mean())
            metrics[f"eval/{mode}/success"] = float(np.mean(per_cat_success))
            metrics[f"eval/{mode}/length"] = float(np.mean(per_cat_length))
    finally:
        if owned is not None:
            owned.close()
    return metrics


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and 1, unlike the normal one).

    Args:
        successes: successful episodes, 0 <= successes <= n.
        n: episodes; 0 gives the uninformative (0, 1).
        z: the normal quantile (1.96 for 95%).

    Returns:
        (low, high), clipped to [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_splits(
    env_fns: Mapping[str, Callable[[], TextEnv]],
    act_greedy: ActFn,
    act_sample: ActFn | None,
    generator: torch.Generator,
    *,
    categories: Sequence[str],
    num_envs: int,
    episodes_per_category: int,
    seed: int,
) -> dict[str, float]:
    """:func:`evaluate` on each split (``prefix -> env factory``, e.g. ``""`` and ``"heldout/"``), ``num_envs`` envs
    each, the metric names prefixed (``eval/heldout/greedy/success/<cat>``). ``generator`` (the one ``act_sample``
    draws from) is reseeded with ``seed`` before each split, so sampled evaluations are reproducible."""
    metrics: dict[str, float] = {}
    for prefix, fn in env_fns.items():
        generator.manual_seed(seed)
        result = evaluate([fn] * num_envs, act_greedy, act_sample, categories=categories,
                          episodes_per_category=episodes_per_category, seed=seed)
        metrics.update({k.replace("eval/", f"eval/{prefix}", 1): v for k, v in result.items()})
    return metrics
