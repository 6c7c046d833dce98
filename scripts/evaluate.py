"""Greedy (and sampled) success of a trained run per goal category, with 95% Wilson intervals, as a markdown table.

    python scripts/evaluate.py outputs/2026-12-06/10-00-00                  # the newest complete checkpoint
    python scripts/evaluate.py RUN/checkpoints/step_0000040000.pt --sample  # that checkpoint; sampled policy too
    python scripts/evaluate.py RUN eval.episodes_per_category=200 eval.seed=5000 --json eval.json
    python scripts/evaluate.py RUN '+env.kwargs.split=test' '~env.heldout_kwargs.split' device=cpu

The run is rebuilt from its own ``.hydra/config.yaml`` with the given hydra-style overrides (``+key=value`` adds a
key the saved config lacks, ``~key`` removes one); the model always has the run's vocabulary. Splits, seeds and the
sampling generator are train.py's ``run_eval``'s: with no overrides the numbers equal the run's own final
evaluation at the same checkpoint. A missing path, a run without a complete checkpoint or a corrupt checkpoint
file ends with one line naming it and exit status 2. A lean checkpoint (a LoRA run's, without the frozen base) loads
over the base rebuilt from the run's config once its fingerprint matches; another base ends with one line naming both.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import envs  # noqa: F401 - registers the sacglam/ env ids the run config names (sacglam never imports envs)
from sacglam.run import tools


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a train.py run folder, or a checkpoint file RUN/checkpoints/step_*.pt")
    p.add_argument("overrides", nargs="*", help="hydra-style overrides of the run's config, e.g. eval.seed=5000")
    p.add_argument("--sample", action="store_true", help="also evaluate the sampled policy (as eval.sample=true)")
    p.add_argument("--json", type=Path, help="also write the rows and train.py-named metrics to this JSON file")
    opts = p.parse_intermixed_args(argv)

    def run() -> int:
        loaded = tools.load_run(opts.path, opts.overrides)
        cfg = loaded.cfg
        sample = opts.sample or cfg.eval.sample
        rows, metrics = tools.evaluate_splits(cfg, loaded.agent, loaded.codec, sample=sample)
        n = cfg.eval.episodes_per_category
        print(f"{loaded.checkpoint} (env step {loaded.step}, algo={cfg.algo.name}, env {cfg.env.id})")
        print(f"{n} episodes per goal category and split; episode j of a split uses env seed {cfg.eval.seed} + j "
              f"(sampling generator seeded {cfg.eval.seed}); {cfg.eval.num_envs} envs at once\n")
        print(tools.markdown_table(rows))
        if opts.json is not None:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps({
                "checkpoint": str(loaded.checkpoint), "env_steps": loaded.step, "algo": cfg.algo.name,
                "env_id": cfg.env.id, "overrides": list(opts.overrides), "seed": cfg.eval.seed,
                "episodes_per_category": n, "rows": [asdict(r) for r in rows], "metrics": metrics,
            }, indent=2))
            print(f"\nwrote {opts.json}")
        return 0

    return tools.run_main(run, "evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
