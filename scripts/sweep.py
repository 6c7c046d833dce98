"""A tuning sweep of any method on any env (``sacglam/run/sweep.py`` says what it runs and reports).

    python scripts/sweep.py --env babyai --algo ppo --grid algo.lr=3e-4,1e-3,3e-3 --grid algo.ent_coef=0,0.01 \
        --seeds 2 --steps 12000 --jobs 2 --series sampled/all --out docs/sweep_babyai_ppo.md \
        env.kwargs.level=BabyAI-GoToRedBallNoDists-v0 eval.every=2000
"""

from __future__ import annotations

import sys

from sacglam.run.sweep import main

if __name__ == "__main__":
    sys.exit(main())
