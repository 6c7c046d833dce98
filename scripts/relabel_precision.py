"""Precision, recall and cost of an achieved-goal source against the env's oracle, on generated episodes.

    python scripts/relabel_precision.py --source rule                           # Playground-Text, env rules
    python scripts/relabel_precision.py --source llm --episodes 64              # SmolLM2 proposer + judge
    python scripts/relabel_precision.py --source llm env=bitflip env.kwargs.n_bits=4
    python scripts/relabel_precision.py --source llm relabel.llm.judge=rule     # LLM proposes, rules verify

Episodes come from the configured env (any ``train.py`` override, e.g. ``env=bitflip``), played by a behaviour
that takes the env's expert action with probability ``--expert-prob`` and a uniform admissible action otherwise, so
they hold both achievements and failures, as a learning agent's do. Goals are drawn from every category the env has.
The source judges them in batches of ``--batch`` episodes (as the training loop batches the episodes that end in
one vector step). Printed: one row per goal category (precision and recall of the accepted (step, goal) pairs
against the oracle's, with their counts), the verifier's verdicts, and milliseconds per episode.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
import sys
import time
from typing import Any

import envs  # noqa: F401 - registers the text envs
from sacglam.episodes import EpisodeRecord
from sacglam.relabel import GoalSpace, RelabelStats, make_source
from sacglam.run.tools import compose_config


def play(env: Any, n: int, expert_prob: float, seed: int) -> list[EpisodeRecord]:
    """``n`` episodes of ``env``, goal categories in turn, expert action with probability ``expert_prob``."""
    rng = random.Random(seed)
    cats = list(getattr(env, "goal_categories", [])) or [None]
    out = []
    for i in range(n):
        cat = cats[i % len(cats)]
        obs, info = env.reset(seed=seed + i, options={"goal_category": cat} if cat else None)
        goal, category = info["goal"], info.get("goal_category", "")
        o, c, a, r, ach = [obs], [], [], [], []
        while True:
            cands = list(info["admissible_actions"])
            act = env.expert_action() if rng.random() < expert_prob else rng.choice(cands)
            c.append(cands)
            a.append(cands.index(act))
            obs, rew, term, trunc, info = env.step(act)
            o.append(obs)
            r.append(float(rew))
            ach.append(list(info["achieved_goals"]))
            if term or trunc:
                break
        out.append(EpisodeRecord(f"p{i}", 0, goal, category, o, c, a, r, ach, [0] * len(a), bool(term), bool(trunc),
                                 bool(term and rew > 0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="llm", choices=("oracle", "rule", "llm"))
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--expert-prob", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=16, help="episodes per source call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    ap.add_argument("overrides", nargs="*", help="train.py overrides (env=..., relabel.llm.*=...)")
    args = ap.parse_args()

    import gymnasium
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = compose_config([*args.overrides, f"relabel.source={args.source}"])
    kwargs = dict(cfg.env.kwargs)
    probe: Any = gymnasium.make(cfg.env.id, **kwargs).unwrapped
    cats = list(getattr(probe, "all_goal_categories", None) or probe.goal_categories)
    if "goal_categories" in kwargs or hasattr(probe, "all_goal_categories"):
        kwargs["goal_categories"] = cats
    env = gymnasium.make(cfg.env.id, **kwargs).unwrapped
    episodes = play(env, args.episodes, args.expert_prob, 10_000 + args.seed)
    space = GoalSpace.from_env(env)
    t0 = time.perf_counter()
    source = make_source(cfg.relabel, env, cfg.env.rules, space)
    load_s = time.perf_counter() - t0
    stats = RelabelStats(space)
    t0 = time.perf_counter()
    for lo in range(0, len(episodes), args.batch):
        batch = episodes[lo : lo + args.batch]
        for ep, res in zip(batch, source(batch), strict=True):
            stats.add(ep, res)
        print(f"\r{min(lo + args.batch, len(episodes))}/{len(episodes)} episodes", end="", file=sys.stderr)
    wall = time.perf_counter() - t0
    print(file=sys.stderr)
    m = stats.metrics()
    steps = sum(ep.length for ep in episodes)
    print(f"source={args.source} env={cfg.env.id} {json.dumps(dict(cfg.env.kwargs))} episodes={len(episodes)} "
          f"steps={steps} expert_prob={args.expert_prob} (source built in {load_s:.1f} s)")
    print("| category | precision | recall | true pos | false pos | missed |")
    print("|---|---|---|---|---|---|")
    for c in [*sorted(set(stats.tp) | set(stats.fp) | set(stats.fn)), "all"]:
        keys = [c] if c != "all" else list(set(stats.tp) | set(stats.fp) | set(stats.fn))
        tp, fp, fn = (sum(d[k] for k in keys) for d in (stats.tp, stats.fp, stats.fn))
        prec = f"{tp / (tp + fp):.3f}" if tp + fp else "-"
        rec = f"{tp / (tp + fn):.3f}" if tp + fn else "-"
        print(f"| {c} | {prec} | {rec} | {tp} | {fp} | {fn} |")
    print(f"proposed {stats.counts['proposed']}, accepted {stats.counts['accepted']}, rejected "
          f"{stats.counts['rejected']}, dropped {stats.counts['dropped']}; {1000 * wall / len(episodes):.1f} ms per "
          f"episode ({1000 * wall / max(steps, 1):.1f} ms per step), {wall:.1f} s in all, "
          f"{torch.get_num_threads()} threads")
    if args.json:
        print(json.dumps({**m, "ms_per_episode": 1000 * wall / len(episodes), "episodes": len(episodes)}))


if __name__ == "__main__":
    main()
