"""What the episode log and the achieved-goal sources cost a training run: the same ``train.py`` run, one variant at a
time, timed in one invocation (these machines are noisy: compare ratios within a table, not across tables).

    python scripts/bench_relabel.py                                  # default run, 3,000 env steps per variant
    python scripts/bench_relabel.py --steps 2000 --variants base,episodes,rule,llm,llm_bg
    python scripts/bench_relabel.py --steps 5000 --variants base,episodes -- env.num_envs=32

Variants (each adds overrides to the default run):

* ``base``: ``relabel.source=oracle``, ``logger.episodes=false`` (the reference);
* ``episodes``: ``logger.episodes=true`` (the gzip JSONL episode log);
* ``rule``: ``relabel.source=rule`` (the env's rules, inline);
* ``llm``: ``relabel.source=llm`` (SmolLM2 proposer + judge, inline: the loop waits for the judge);
* ``llm_bg``: the same on a background thread, ``relabel.llm.max_pending=64`` (episodes ending while 64 wait are
  not judged).

With ``--repeat R`` the variants run in R interleaved rounds and each row is the run of median wall time.

Printed: wall seconds of the whole run (model build and evaluation included), env steps/s, the ratio of env steps/s
to ``base`` (the model build, SmolLM2's load for the llm variants, and the final evaluation are inside the wall
time) and, for relabelling variants, the episodes judged and skipped and the judge's ms per episode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "base": [],
    "episodes": ["logger.episodes=true"],
    "rule": ["relabel.source=rule"],
    "llm": ["relabel.source=llm"],
    "llm_bg": ["relabel.source=llm", "relabel.llm.background=true", "relabel.llm.max_pending=64"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="env steps per run")
    ap.add_argument("--variants", default="base,episodes,rule", help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all variants, interleaved; the median is shown")
    ap.add_argument("overrides", nargs="*", help="train.py overrides for every variant")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    runs: dict[str, list[tuple[float, dict[str, float], int]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for (rnd, name) in ((r, n) for r in range(args.repeat) for n in names):
            run_dir = Path(tmp) / f"{name}-{rnd}"
            cmd = [sys.executable, str(ROOT / "train.py"), f"total_env_steps={args.steps}", "time_limit_min=0",
                   "eval.every=0", "eval.episodes_per_category=4", "checkpoint.every=0", "logger.progress=false",
                   *VARIANTS[name], *args.overrides, f"hydra.run.dir={run_dir}"]
            print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode:
                sys.exit(f"[{name}] failed:\n{done.stderr[-3000:]}")
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            size = sum(f.stat().st_size for f in (run_dir / "episodes").glob("*.gz")) if name == "episodes" else 0
            runs[name].append((wall, last, size))
    rows = []
    for name, got in runs.items():  # the median run by wall time
        wall, last, size = sorted(got, key=lambda x: x[0])[len(got) // 2]
        rows.append((name, wall, last, size))
    base = next((r for r in rows if r[0] == "base"), rows[0])
    print(f"\n{args.steps} env steps per run, median of {args.repeat} interleaved round(s), overrides "
          f"{args.overrides or 'none'}\n")
    print("| variant | wall s | env steps/s | x base | episodes judged | skipped | judge ms/episode | log bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, wall, last, size in rows:
        sps = last["step"] / wall
        judged = last.get("relabel/episodes")
        print(f"| {name} | {wall:.1f} | {sps:.1f} | {sps / (base[2]['step'] / base[1]):.2f} | "
              f"{'-' if judged is None else int(judged)} | {int(last.get('relabel/skipped', 0)) if judged else '-'} | "
              f"{last.get('relabel/judge_ms', float('nan')):.1f} | {size or '-'} |")


if __name__ == "__main__":
    main()
