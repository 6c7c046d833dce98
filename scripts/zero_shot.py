"""Zero-shot success of an untrained model per goal category and split, with 95% Wilson intervals.

    python scripts/zero_shot.py model=smollm2 'env.kwargs.goal_categories=[grasp]' prompt.chat=true
    python scripts/zero_shot.py --episodes 64 --sample model=smollm2
    python scripts/zero_shot.py --grid model=smollm2 --variant 'plain:' \\
        --variant 'chat:prompt.chat=true' --variant 'chat+list:prompt.chat=true,prompt.list_actions=true'

The config is composed from ``conf/`` with the overrides exactly as ``python train.py OVERRIDES`` would (Hydra's
compose API), and the model and prompt codec are built by ``sacglam.run.builders.build_model`` (train.py's builder), so
every model and prompt option acts as in training. The policy is the one training starts from:
``softmax(score / agent.temperature)`` over the admissible actions, greedy = its argmax. Splits are train.py's
evaluation splits: ``train`` (the env's kwargs and ``env.eval_kwargs``) and ``heldout`` (held-out objects) where the
env config has ``env.heldout_kwargs``. Episode j of a split uses env seed ``eval.seed + j`` (default 1000000;
``eval.seed=...`` changes it), the sampled policy a generator seeded ``eval.seed``.

``--grid`` evaluates several variants, each ``NAME:OVERRIDE,OVERRIDE,...`` (added after the shared overrides; commas
inside brackets or quotes stay within one override, so ``'x:env.kwargs.goal_categories=[grasp,grow_plant]'`` works),
and prints one table.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import envs  # noqa: F401 - registers the sacglam/ env ids the run config names (sacglam never imports envs)
from sacglam.algos.ppo.learner import PPOAgent, PPOConfig
from sacglam.run import builders, tools


def split_overrides(text: str) -> list[str]:
    """Split ``a=1,b=[x,y],c='p,q'`` on the commas outside brackets, braces, parentheses and quotes."""
    out: list[str] = []
    depth, quote, start = 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [o.strip() for o in out if o.strip()]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``'name:o1,o2'`` -> ``("name", ["o1", "o2"])``; an empty override list is the shared overrides alone.

    Raises:
        ValueError: no ``NAME:`` prefix.
    """
    name, sep, rest = spec.partition(":")
    if not sep or not name.strip() or "=" in name:
        raise ValueError(f"--variant {spec!r}: write NAME:OVERRIDE,OVERRIDE,... (e.g. 'chat:prompt.chat=true')")
    return name.strip(), split_overrides(rest)


def zero_shot(overrides: Sequence[str], episodes: int, sample: bool) -> tuple[list[tools.Row], dict[str, float], int]:
    """Evaluate the untrained model of ``python train.py OVERRIDES`` on train.py's evaluation splits.

    Returns:
        (rows, metrics, seed): the table rows, the metrics under train.py's names, and the first episode seed.
    """
    cfg = tools.compose_config(overrides)
    device = builders.resolve_device(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, _, codec, _ = tools.build_model(cfg, device)
    # The policy alone: PPOAgent.act is score -> softmax(score / temperature) -> choose, as Agent.act, without the
    # SAC agent's target copy of the trunk; its (linear) value head is never used here.
    policy = PPOAgent(model, PPOConfig(value_hidden=[]), temperature=cfg.agent.temperature,
                      length_norm=cfg.agent.length_norm).to(device).eval()
    rows, metrics = tools.evaluate_splits(cfg, policy, codec, sample=sample, episodes=episodes)
    return rows, metrics, cfg.eval.seed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="train.py overrides shared by every variant, e.g. model=smollm2")
    p.add_argument("--episodes", type=int, default=32, help="episodes per goal category and split (default 32)")
    p.add_argument("--sample", action="store_true", help="also evaluate the sampled policy")
    p.add_argument("--grid", action="store_true", help="evaluate every --variant and print one table")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:OVERRIDES",
                   help="with --grid: a named list of comma-separated overrides, e.g. 'chat:prompt.chat=true'")
    p.add_argument("--json", type=Path, help="also write the rows and metrics per variant to this JSON file")
    opts = p.parse_intermixed_args(argv)
    if opts.episodes < 1:
        p.error(f"--episodes must be >= 1, got {opts.episodes}")
    if opts.variant and not opts.grid:
        p.error("--variant needs --grid")
    if opts.grid and not opts.variant:
        p.error("--grid needs at least one --variant NAME:OVERRIDES (e.g. --variant 'plain:')")

    def run() -> int:
        variants = [parse_variant(v) for v in opts.variant] if opts.grid else [("", [])]
        names = [name for name, _ in variants]
        if len(set(names)) != len(names):
            raise ValueError(f"--variant names repeat: {names}")
        rows: list[tools.Row] = []
        labels: list[str] = []
        report: dict[str, object] = {}
        seeds: list[int] = []
        for name, extra in variants:
            overrides = [*opts.overrides, *extra]
            start = time.perf_counter()
            got, metrics, seed = zero_shot(overrides, opts.episodes, opts.sample)
            seeds.append(seed)
            print(f"{name or 'zero-shot'}: {' '.join(overrides) or '(defaults)'}; seeds from {seed} "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)
            rows += got
            labels += [name] * len(got)
            report[name or "zero-shot"] = {"overrides": overrides, "seed": seed, "rows": [asdict(r) for r in got],
                                           "metrics": metrics}
            gc.collect()  # the next variant builds its own model
        first = str(seeds[0]) if len(set(seeds)) == 1 else "S (per variant, above)"
        print(f"\nUntrained policy; {opts.episodes} episodes per goal category and split; episode j of a split "
              f"uses env seed {first} + j (sampling generator seeded {first}).\n")
        print(tools.markdown_table(rows, labels if opts.grid else None))
        if opts.json is not None:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps({"episodes_per_category": opts.episodes, "variants": report}, indent=2))
            print(f"\nwrote {opts.json}")
        return 0

    return tools.run_main(run, "zero_shot.py")


if __name__ == "__main__":
    sys.exit(main())
