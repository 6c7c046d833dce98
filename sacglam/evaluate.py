"""Evaluation rollouts per goal category, on held-out seeds, with the act function batched across envs.

    metrics = evaluate(env_fns, act_greedy, act_sample, categories=["grasp", "grow_plant"],
                       episodes_per_category=50, seed=10_000)
    metrics["eval/greedy/success/grasp"], metrics["eval/greedy/success"], metrics["eval/sample/length/grasp"], ...

Episode ``j`` of the plan (categories in the given order, ``episodes_per_category`` each) is reset with seed
``seed + j`` and ``options={"goal_category": c}``, whatever the number of envs, so results depend only on the seed and
the act functions. Greedy and sampled evaluation run the same episodes, played in waves of one task per env by the
episode player (``sacglam.player.play_waves``, which the training collector and ETO's exploration use too). Like the
collector, this module never imports ``envs``: environments come in as factories or as a vector env.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from sacglam.player import Player, VectorTextEnv
from sacglam.types import ActFn, TextEnv
from sacglam.waves import EnvList, Task, play_waves


def _is_vector_env(envs: object) -> bool:
    return hasattr(envs, "num_envs") and hasattr(envs, "step") and hasattr(envs, "reset")


def _run_episodes(
    player: Player, act: ActFn, plan: Sequence[str], seed: int, max_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run one episode per entry of ``plan`` (a goal category each; episode j resets with seed ``seed + j``) in waves
    of ``num_envs``; the last wave's spare envs are reset too (a vector env resets all) and ignored.

    Returns:
        success [E] bool, length [E] int, return [E] float, in plan order.
    """
    tasks = [Task(j, seed + j, c) for j, c in enumerate(plan)]
    episodes = [ep for wave, _ in play_waves(player, tasks, act, max_steps=max_steps, fill=True) for ep in wave]
    success = np.array([ep.success for ep in episodes], dtype=bool)
    length = np.array([ep.length for ep in episodes], dtype=np.int64)
    ret = np.array([ep.return_ for ep in episodes], dtype=np.float64)
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
    owned: EnvList | None = None
    if _is_vector_env(envs):
        vec: VectorTextEnv | EnvList = envs  # type: ignore[assignment]
    else:
        fns = list(envs)  # type: ignore[arg-type]
        if not fns:
            raise ValueError("evaluate got an empty list of env factories")
        owned = vec = EnvList([fn() for fn in fns])
    player = Player(vec)
    modes: list[tuple[str, ActFn]] = [("greedy", act_greedy)]
    if act_sample is not None:
        modes.append(("sample", act_sample))
    metrics: dict[str, float] = {}
    try:
        for mode, act in modes:
            success, length, ret = _run_episodes(player, act, plan, seed, max_steps)
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
        result = evaluate(
            [fn] * num_envs,
            act_greedy,
            act_sample,
            categories=categories,
            episodes_per_category=episodes_per_category,
            seed=seed,
        )
        metrics.update({k.replace("eval/", f"eval/{prefix}", 1): v for k, v in result.items()})
    return metrics
