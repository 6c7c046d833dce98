"""The options of ETO (``algo=eto``, ``conf/algo/eto.yaml``), light enough for the Hydra schema.

This module imports only the standard library, so ``sacglam.config`` can compose the schema without torch;
``sacglam.algos.eto.dpo`` imports :class:`ETOConfig` from here and re-exports it. Every option is checked against
``ETO_DOMAINS`` when the config is built (``sacglam.validate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sacglam.validate import (
    COUNT,
    NONNEGATIVE,
    POSITIVE,
    Domain,
    Each,
    Maybe,
    OneOf,
    Range,
    Text,
    check_domains,
    refuse,
)

EXPLORE: tuple[str, ...] = ("greedy", "sample")
PAIR_WITH: tuple[str, ...] = ("expert", "best")


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
        """Check every option against ``ETO_DOMAINS``, and that behaviour cloning has epochs when it has episodes
        (``ConfigError`` names the option as ``algo.<option>``)."""
        check_domains(self, "algo", ETO_DOMAINS)
        if self.warm_start_episodes > 0 and self.sft_epochs < 1:
            raise refuse(self, "algo", "sft_epochs", f">= 1 when algo.warm_start_episodes={self.warm_start_episodes}"
                         " > 0 (set algo.warm_start_episodes=0 to skip behaviour cloning)")

    def beta(self, round_index: int) -> float:
        """DPO beta of round ``round_index`` (0-based); rounds past the list reuse its last value."""
        return float(self.betas[min(_check_round(round_index), len(self.betas) - 1)])

    def lr(self, round_index: int) -> float:
        """DPO learning rate of round ``round_index`` (0-based); rounds past the list reuse its last value."""
        return float(self.lrs[min(_check_round(round_index), len(self.lrs) - 1)])


ETO_DOMAINS: dict[str, Domain] = {
    "name": OneOf(("eto",)),
    "tasks": COUNT,
    "warm_start_episodes": Range(low=0, integer=True, note="0 = no behaviour cloning"),
    "sft_epochs": Range(low=0, integer=True),  # (>= 1 with warm-start episodes: checked in __post_init__)
    "sft_lr": POSITIVE,
    "sft_batch_size": COUNT,
    "rounds": Range(low=0, integer=True, note="0 = no DPO round"),
    "betas": Each(POSITIVE, nonempty=True),
    "lrs": Each(POSITIVE, nonempty=True),
    "epochs": COUNT,
    "explore": OneOf(EXPLORE),
    "pair_with": OneOf(PAIR_WITH),
    "margin": Range(low=0, integer=True),
    "sft_coef": NONNEGATIVE,
    "batch_size": COUNT,
    "max_grad_norm": Range(low=0, finite=False, note="0 = no clipping"),
    "max_steps_per_batch": COUNT,
    "pairs_file": Maybe(Text("a non-empty path")),
}
"""The domain of each ``ETOConfig`` field (``sacglam.validate``)."""


def _check_round(round_index: int) -> int:
    if round_index < 0:
        raise ValueError(f"ETO round index must be >= 0, got {round_index}")
    return round_index


__all__ = ["ETO_DOMAINS", "EXPLORE", "PAIR_WITH", "ETOConfig"]
