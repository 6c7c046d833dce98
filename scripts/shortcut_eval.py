"""Greedy success of a trained Playground-Text run on growth goals, split by whether the scene offers a shortcut.

    python scripts/shortcut_eval.py outputs/2026-12-06/10-00-00                # newest checkpoint of a run folder
    python scripts/shortcut_eval.py RUN --episodes 128 --categories grow_herbivore

For the ``grown_distractors`` ablation. Reference scenes (the default, ``grown_distractors=0``) start every plant and
animal young, so a herbivore goal needs the whole chain (water -> seed -> plant -> herbivore). With
``env.kwargs.grown_distractors=0.5`` (this project's scenes before 2026-12-07) a living distractor is grown with
even odds, so a herbivore goal's scene may already hold a grown plant (48% of them) and a carnivore goal's a grown
herbivore (40%): the goal then takes 4 actions (go to the food, grasp it, go to the baby, release) instead of the
chain. This script evaluates each kind of scene apart, on ablation scenes (the run's own ``grown_distractors``, or
0.5 for a run trained on reference scenes): ``reset`` is redrawn with derived seeds until the scene has, or lacks,
the grown food. It tells whether a policy learned the chain or the shortcut. The run is rebuilt from its own
``.hydra/config.yaml`` and newest checkpoint (``sacglam/run/tools.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from envs.playground_text import OBJECTS
from sacglam.config import TrainConfig
from sacglam.evaluate import evaluate
from sacglam.pipeline import make_act_fn
from sacglam.run import builders, tools

FOOD_STAGE = {"grow_herbivore": "plant", "grow_carnivore": "herbivore"}  # the grown food each goal category eats
MAX_REDRAWS = 1000
ABLATION_GROWN = 0.5  # grown_distractors of the evaluation scenes for a run trained on reference scenes


def has_shortcut(objects: Sequence[str], category: str) -> bool:
    """Whether a scene already holds the grown food of a ``category`` goal (a grown plant for a herbivore)."""
    return any(OBJECTS[o].stage == FOOD_STAGE[category] for o in objects)


class SceneFilter:
    """A Playground-Text env whose ``reset`` only returns scenes with (``shortcut=True``) or without the shortcut.

    ``reset(seed=s)`` tries seeds ``s * MAX_REDRAWS + k`` for k = 0, 1, ... until the scene qualifies, so a seeded
    evaluation stays reproducible. Everything else is the wrapped env's.
    """

    def __init__(self, env: Any, shortcut: bool) -> None:
        self.env, self.shortcut = env, shortcut

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        category = (options or {}).get("goal_category")
        if category not in FOOD_STAGE:
            raise ValueError(f"SceneFilter evaluates goal categories {list(FOOD_STAGE)}, got {category!r}")
        for k in range(MAX_REDRAWS):
            out = self.env.reset(seed=None if seed is None else seed * MAX_REDRAWS + k, options=options)
            if has_shortcut(self.env.state.objects, category) == self.shortcut:
                return out
        raise RuntimeError(f"no {category} scene {'with' if self.shortcut else 'without'} the shortcut "
                           f"in {MAX_REDRAWS} draws")


def load_run(run_dir: Path) -> tuple[TrainConfig, Callable[[], Any], Any]:
    """The run's config, env factory and greedy act function, with the newest checkpoint's agent weights."""
    run = tools.load_run(run_dir, ["device=cpu"])
    if run.cfg.env.id != "sacglam/PlaygroundText-v0":
        raise ValueError(f"{run_dir} trained on {run.cfg.env.id}; this script is for Playground-Text runs")
    # Evaluation scenes as train.py builds them, with grown distractors so that both kinds of scene exist.
    eval_kwargs = {**run.cfg.env.kwargs, **run.cfg.env.eval_kwargs}
    grown = float(eval_kwargs.get("grown_distractors", 0.0)) or ABLATION_GROWN
    env_fn = builders.make_env_fn(run.cfg, **{**run.cfg.env.eval_kwargs, "grown_distractors": grown})
    print(f"{run.checkpoint}", flush=True)
    return run.cfg, env_fn, make_act_fn(run.agent, run.codec, greedy=True, device=run.device)


def _filtered(env_fn: Callable[[], Any], shortcut: bool) -> Callable[[], SceneFilter]:
    return lambda: SceneFilter(env_fn(), shortcut)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a train.py run folder (with .hydra/ and checkpoints/)")
    p.add_argument("--episodes", type=int, default=64, help="greedy episodes per category and kind of scene")
    p.add_argument("--categories", default="grow_herbivore,grow_carnivore")
    p.add_argument("--seed", type=int, default=777, help="evaluation seed")
    p.add_argument("--num-envs", type=int, default=8)
    opts = p.parse_args(argv)
    categories = [c.strip() for c in opts.categories.split(",") if c.strip()]
    bad = [c for c in categories if c not in FOOD_STAGE]
    if bad:
        raise SystemExit(f"--categories: {bad} have no shortcut; choose from {list(FOOD_STAGE)}")
    try:
        _, env_fn, act = load_run(opts.run)
    except tools.EXPECTED_ERRORS as exc:
        raise SystemExit(f"shortcut_eval.py: error: {tools.one_line(exc)}") from None
    torch.set_num_threads(1)
    print("| scene | " + " | ".join(categories) + " |\n|---|" + "---|" * len(categories))
    for shortcut in (True, False):
        fns = [_filtered(env_fn, shortcut)] * opts.num_envs
        result = evaluate(fns, act, None, categories=categories, episodes_per_category=opts.episodes, seed=opts.seed)
        row = " | ".join(f"{result[f'eval/greedy/success/{c}']:.3f}" for c in categories)
        print(f"| {'with' if shortcut else 'without'} the shortcut | {row} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
