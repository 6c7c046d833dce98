"""Greedy grasp success of a trained Playground-Text run, split by the kind of object the goal names.

    python scripts/grasp_by_kind.py outputs/2026-12-07/10-00-00                # newest checkpoint of a run folder
    python scripts/grasp_by_kind.py RUN_A RUN_B --episodes 64

On reference scenes every plant and animal starts young except a grasp goal's target, so a grown target is the only
grown thing in the room (it can be found without reading its name), while a seed, a baby animal or a piece of
furniture stands among others of its kind and must be picked by name. This script tells which of the two a policy
learned (docs/results.md, "SAC against PPO-GLAM on grasp goals"). Each kind is evaluated on its own scenes:
``reset`` is redrawn with derived seeds until the grasp goal names an object of that kind. The run is rebuilt from
its own ``.hydra/config.yaml`` and newest checkpoint (``sacglam/run/tools.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import envs  # noqa: F401 - registers the sacglam/ env ids the run config names
from envs.playground_text import OBJECTS
from sacglam.evaluate import evaluate
from sacglam.pipeline import make_act_fn
from sacglam.run import builders, tools

KINDS: tuple[str, ...] = ("grown plant", "grown animal", "furniture", "water", "seed", "baby animal")
MAX_REDRAWS = 2000


def target_kind(goal: str) -> str:
    """The kind of object a grasp goal names (one of ``KINDS``); ValueError for a goal that is no grasp goal. Pure."""
    if not goal.startswith("Grasp ") or goal.removeprefix("Grasp ") not in OBJECTS:
        raise ValueError(f"{goal!r} is not a Playground-Text grasp goal ('Grasp <object>')")
    stage = OBJECTS[goal.removeprefix("Grasp ")].stage
    if stage == "plant":
        return "grown plant"
    if stage.startswith("baby_"):
        return "baby animal"
    if stage in ("seed", "furniture", "water"):
        return stage
    return "grown animal"


class KindFilter:
    """A Playground-Text env whose ``reset`` returns only grasp goals naming an object of ``kind``.

    ``reset(seed=s)`` tries seeds ``s * MAX_REDRAWS + k`` for k = 0, 1, ... until the goal qualifies, so a seeded
    evaluation stays reproducible. Everything else is the wrapped env's.
    """

    def __init__(self, env: Any, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
        self.env, self.kind = env, kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        for k in range(MAX_REDRAWS):
            out = self.env.reset(seed=None if seed is None else seed * MAX_REDRAWS + k, options=options)
            if target_kind(out[1]["goal"]) == self.kind:
                return out
        raise RuntimeError(f"no grasp goal naming a {self.kind} in {MAX_REDRAWS} draws")


def kind_shares(env: Any, draws: int = 400) -> Counter[str]:
    """How often each kind is a grasp goal's target over ``draws`` seeded resets (seeds 0 .. draws - 1)."""
    return Counter(target_kind(env.reset(seed=s, options={"goal_category": "grasp"})[1]["goal"]) for s in range(draws))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="train.py run folders (with .hydra/ and checkpoints/)")
    p.add_argument("--episodes", type=int, default=32, help="greedy episodes per kind")
    p.add_argument("--seed", type=int, default=777, help="evaluation seed")
    p.add_argument("--num-envs", type=int, default=4)
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | " + " | ".join(KINDS) + " |\n|---|" + "---:|" * len(KINDS))
    for run_dir in opts.runs:
        try:
            run = tools.load_run(run_dir, ["device=cpu"])
        except tools.EXPECTED_ERRORS as exc:
            raise SystemExit(f"grasp_by_kind.py: error: {tools.one_line(exc)}") from None
        env_fn = builders.make_env_fn(run.cfg, **run.cfg.env.eval_kwargs)
        act = make_act_fn(run.agent, run.codec, greedy=True, device=run.device)
        shares = kind_shares(env_fn())
        cells = []
        for kind in KINDS:
            if not shares[kind]:
                cells.append("-")
                continue
            fns = [lambda kind=kind, make=env_fn: KindFilter(make(), kind)] * opts.num_envs
            result = evaluate(fns, act, None, categories=["grasp"], episodes_per_category=opts.episodes,
                              seed=opts.seed)
            cells.append(f"{result['eval/greedy/success/grasp']:.2f} ({shares[kind] / 400:.0%})")
        print(f"| {run_dir} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
