"""The options of ETO (``algo=eto``, ``conf/algo/eto.yaml``), light enough for the Hydra schema.

This module imports only the standard library, so ``sacglam.config`` can compose the schema without torch;
``sacglam.algos.eto.dpo`` imports :class:`ETOConfig` from here and re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ETOConfig:
    """Options of ETO. Defaults are the published ones (docs/design/ALGORITHM.md section 7)."""

    name: str = "eto"  # which algorithm train.py runs
    tasks: int = 256  # training tasks (reset seed + goal category), each explored once per round
    warm_start_episodes: int = 256  # expert episodes for behaviour cloning before the first round; 0 = no SFT
    sft_epochs: int = 3  # epochs of behaviour cloning on the expert episodes
    sft_lr: float = 2e-5  # learning rate of behaviour cloning
    sft_batch_size: int = 16  # expert trajectories per behaviour-cloning step
    rounds: int = 3  # explore -> pair -> DPO rounds
    betas: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.5])  # DPO beta per round (last one repeats)
    lrs: list[float] = field(default_factory=lambda: [1e-6, 5e-7, 5e-7])  # DPO lr per round (last one repeats)
    epochs: int = 3  # DPO epochs over a round's pairs
    explore: str = "greedy"  # how the policy explores the tasks: greedy | sample
    pair_with: str = "expert"  # what an explored trajectory is paired with: expert | best (best seen per task)
    margin: int = 5  # the rejected trajectory is cut at the chosen one's length plus this many turns
    sft_coef: float = 0.0  # weight of an SFT term on the chosen trajectories added to DPO (published: 0)
    batch_size: int = 8  # pairs per DPO optimizer step
    max_grad_norm: float = 1.0  # clip the gradient norm of every SFT/DPO step (0 = no clipping)
    max_steps_per_batch: int = 64  # states per forward pass when scoring trajectories (memory, not results)
    # A user's pairs (ETO's JSONL layout with candidates): run the DPO phase alone on them (no expert, no
    # exploration). None = full ETO; each round's own pairs are always written to <run>/pairs/round<r>.jsonl.
    pairs_file: str | None = None

    def __post_init__(self) -> None:
        """Check every field; raise ``ValueError`` naming the bad one."""
        ints = {"tasks": (self.tasks, 1), "warm_start_episodes": (self.warm_start_episodes, 0),
                "sft_epochs": (self.sft_epochs, 0), "rounds": (self.rounds, 0), "epochs": (self.epochs, 1),
                "margin": (self.margin, 0), "batch_size": (self.batch_size, 1),
                "sft_batch_size": (self.sft_batch_size, 1), "max_steps_per_batch": (self.max_steps_per_batch, 1)}
        for key, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ETOConfig.{key} must be an int >= {low}, got {value!r}")
        if self.warm_start_episodes > 0 and self.sft_epochs < 1:
            raise ValueError(f"ETOConfig.sft_epochs must be >= 1 when warm_start_episodes="
                             f"{self.warm_start_episodes} > 0 (set warm_start_episodes=0 to skip SFT), "
                             f"got {self.sft_epochs}")
        if not self.sft_lr > 0:
            raise ValueError(f"ETOConfig.sft_lr must be > 0, got {self.sft_lr!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"ETOConfig.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if not self.sft_coef >= 0:
            raise ValueError(f"ETOConfig.sft_coef must be >= 0, got {self.sft_coef!r}")
        for key, values in (("betas", self.betas), ("lrs", self.lrs)):
            values = list(values)
            if not values:
                raise ValueError(f"ETOConfig.{key} must hold at least one value (one per round, the last repeats)")
            bad = [v for v in values if not (isinstance(v, int | float) and v > 0)]
            if bad:
                raise ValueError(f"ETOConfig.{key} must be positive numbers, got {values!r}")
        if self.explore not in ("greedy", "sample"):
            raise ValueError(f"ETOConfig.explore must be 'greedy' or 'sample', got {self.explore!r}")
        if self.pair_with not in ("expert", "best"):
            raise ValueError(f"ETOConfig.pair_with must be 'expert' or 'best', got {self.pair_with!r}")
        if self.pairs_file is not None and not (isinstance(self.pairs_file, str) and self.pairs_file):
            raise ValueError(f"ETOConfig.pairs_file must be a non-empty path or None, got {self.pairs_file!r}")

    def beta(self, round_index: int) -> float:
        """DPO beta of round ``round_index`` (0-based); rounds past the list reuse its last value."""
        return float(self.betas[min(_check_round(round_index), len(self.betas) - 1)])

    def lr(self, round_index: int) -> float:
        """DPO learning rate of round ``round_index`` (0-based); rounds past the list reuse its last value."""
        return float(self.lrs[min(_check_round(round_index), len(self.lrs) - 1)])


def _check_round(round_index: int) -> int:
    if round_index < 0:
        raise ValueError(f"ETO round index must be >= 0, got {round_index}")
    return round_index


__all__ = ["ETOConfig"]
