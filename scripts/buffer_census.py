"""What is in a run's replay buffer: achieved goals and pursued goals, grouped, from a checkpoint.

    python scripts/buffer_census.py outputs/2026-11-21/10-00-00            # the newest checkpoint of a run folder
    python scripts/buffer_census.py path/to/checkpoints/step_0000100000.pt --top 10
    python scripts/buffer_census.py RUN --env sacglam/PlaygroundText-v0   # group by the env's goal categories
    python scripts/buffer_census.py RUN --env sacglam/PlaygroundText-v0 --env-kwargs '{"big_animals": true}'

HER can only teach goals that were achieved somewhere in the buffer, so this is the first thing to look at when a
goal category does not learn. Goals are grouped by their first word (``Grasp``, ``Grow``, ``Make``, ...), or with
``--env`` by the env's own ``goal_category`` (Playground-Text's ``Grow`` goals are three categories).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import torch

from sacglam.checkpoint import load_checkpoint, resolve_resume


def census(state: dict[str, Any]) -> dict[str, collections.Counter[str]]:
    """Counts over the stored transitions of one checkpoint's buffer.

    Returns:
        ``achieved``: goal -> times newly achieved; ``pursued``: goal -> transitions with it as (stored) goal;
        ``rewarded``: goal -> transitions with it as goal and a positive reward.
    """
    state = state.get("learner", state)  # train.py keeps the SAC learner's buffer and encoder under "learner"
    buffer, names = state["buffer"], {v: k for k, v in state["encoder"]["goal_ids"].items()}
    stored = min(int(buffer["pos"]), buffer["goal"].shape[0])  # rows written, per env column
    achieved = buffer["achieved"][:stored].reshape(-1, buffer["achieved"].shape[-1])
    goal = buffer["goal"][:stored].reshape(-1)
    reward = buffer["reward"][:stored].reshape(-1)
    out: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in ("achieved", "pursued", "rewarded")}
    out["achieved"].update(names[int(g)] for g in achieved[achieved >= 0].tolist())
    out["pursued"].update(names[int(g)] for g in goal.tolist())
    out["rewarded"].update(names[int(g)] for g in goal[reward > 0].tolist())
    return out


def by_first_word(counts: collections.Counter[str]) -> collections.Counter[str]:
    grouped: collections.Counter[str] = collections.Counter()
    for goal, n in counts.items():
        grouped[goal.split()[0] if goal.split() else goal] += n
    return grouped


def by_category(counts: collections.Counter[str], category: Any) -> collections.Counter[str]:
    """Group goals by ``category(goal)`` (an env's ``goal_category``)."""
    grouped: collections.Counter[str] = collections.Counter()
    for goal, n in counts.items():
        grouped[str(category(goal))] += n
    return grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a run folder (newest complete checkpoint) or a checkpoint file")
    parser.add_argument("--top", type=int, default=0, help="also list the N most achieved single goals")
    parser.add_argument("--env", default=None, help="group by this env id's goal categories, e.g. "
                        "sacglam/PlaygroundText-v0 (default: by first word)")
    parser.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of that env, e.g. "
                        "'{\"big_animals\": true}' for a run with Playground-Text's big animals")
    opts = parser.parse_args()
    path = resolve_resume("auto", opts.path) if opts.path.is_dir() else opts.path
    if path is None:
        raise SystemExit(f"no complete checkpoint under {opts.path}")
    counts = census(load_checkpoint(path, map_location="cpu", weights_only=False))
    if opts.env:
        import gymnasium

        import envs  # noqa: F401 - registers the envs

        env = gymnasium.make(opts.env, **json.loads(opts.env_kwargs)).unwrapped
        groups = {k: by_category(v, env.goal_category) for k, v in counts.items()}  # type: ignore[attr-defined]
    else:
        groups = {k: by_first_word(v) for k, v in counts.items()}
    total = sum(groups["pursued"].values())
    print(f"{path}: {total} stored transitions\n")
    print("| goal group | achieved (events) | pursued (transitions) | rewarded (transitions) |")
    print("|---|---:|---:|---:|")
    for name in sorted(set().union(*groups.values())):
        print(f"| {name} | {groups['achieved'][name]} | {groups['pursued'][name]} | {groups['rewarded'][name]} |")
    if opts.top:
        print(f"\nMost achieved goals (top {opts.top}):")
        for goal, n in counts["achieved"].most_common(opts.top):
            print(f"  {n:7d}  {goal}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
