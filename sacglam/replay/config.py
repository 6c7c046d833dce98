"""The replay buffer's options: ``BufferConfig`` and its hindsight options ``HERConfig``.

Plain dataclasses whose options are checked in ``__post_init__`` against the domain tables below
(``sacglam.validate``); this module imports only the standard library (no torch, no numpy), so the Hydra schema
(``sacglam.config``) imports it without loading the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sacglam.validate import (
    COUNT,
    PROBABILITY,
    Device,
    Domain,
    Flag,
    OneOf,
    Range,
    check_domains,
)

Strategy = Literal["future", "final", "episode"]
STRATEGIES: tuple[str, ...] = ("future", "final", "episode")
TOKEN_DTYPES: tuple[str, ...] = ("int16", "int32", "int64")  # the names of the torch dtypes tokens may be stored in
NATIVE_MODES: tuple[str, ...] = ("auto", "on", "off")


@dataclass
class HERConfig:
    """Hindsight relabelling options.

    Attributes:
        strategy: which achieved goal replaces the stored one. ``future``: a goal achieved at a step t' >= t of the
            same episode (uniform over the achieving steps); ``final``: a goal achieved at the episode's last achieving
            step (it may precede t, then t' - t < 0); ``episode``: a goal achieved at any step of the episode.
        ratio: probability that a sampled transition is relabelled (0.8 = SB3's 4 relabelled per real sample).
            Transitions with no eligible achieved goal keep their goal.
        rarity_draws: m achieving steps drawn per relabelled transition; the goal achieved fewest times so far (over
            the whole run, counted by the buffer) wins, ties to the first draw. 1 = plain HER. Rare achievements
            (growing a plant among hundreds of grasps) then become the relabel goal whenever the episode offers one.
        rare_fraction: fraction of each batch drawn not uniformly but in proportion to ``1 / count(g)``, where g is
            the rarest goal achieved within its step limit after the row, in the same episode (rows with none are
            drawn only when nothing else is stored). 0 = uniform sampling. Prioritised replay of what was rarely
            achieved: the few transitions that lead to a rare goal are replayed far more often than uniform sampling
            would, while the rest of the batch stays uniform.
    """

    strategy: str = "future"  # future | final | episode
    ratio: float = 0.8  # in [0, 1]; 0 disables HER
    rarity_draws: int = 1  # >= 1; m draws, the rarest goal wins
    rare_fraction: float = 0.0  # in [0, 1]; share of the batch sampled by rarity

    def __post_init__(self) -> None:
        """Check every option against ``HER_DOMAINS`` (``ConfigError`` names it as ``buffer.her.<option>``)."""
        check_domains(self, "buffer.her", HER_DOMAINS)

    @property
    def counts_goals(self) -> bool:
        """Whether the buffer must count achievements per goal (a rarity option is on)."""
        return self.rarity_draws > 1 or self.rare_fraction > 0


@dataclass
class BufferConfig:
    """Replay buffer options (shapes are fixed at construction; the buffer is preallocated)."""

    capacity: int = 100_000  # transitions over all envs; each env gets capacity // n_envs rows
    n_step: int = 1  # n of the n-step return (1 = one-step TD)
    gamma: float = 0.99  # discount used for the n-step return and the bootstrap factor
    device: str = "auto"  # where the storage lives; "auto" = cuda when available, else cpu
    max_obs_tokens: int = 128  # Lo, observation width in tokens
    max_goal_tokens: int = 16  # Lg, goal width in tokens
    max_cands: int = 16  # K, candidate actions per state
    max_cand_tokens: int = 8  # Lc, tokens per candidate
    max_goals: int = 4096  # rows of the goal table (distinct goals ever registered)
    max_achieved: int = 4  # G, goals newly achieved by one step (fixed width, padded with -1)
    token_dtype: str = "int32"  # int16 halves token memory and is exact when the vocabulary has < 32768 ids
    her: HERConfig = field(default_factory=HERConfig)  # hindsight relabelling (ratio 0 disables it)
    compile: bool = False  # torch.compile the sampling path (one-off compile per batch size; slower than eager on CPU)
    # CPU buffers add and sample with one C call each (sacglam/replay/native.py) instead of ~80 / ~100 torch ops; same
    # result, several times faster. auto: when it builds (else torch, with a warning); on: required (an error says why
    # not); off: torch.
    native: str = "auto"

    def __post_init__(self) -> None:
        """Check every option against ``BUFFER_DOMAINS`` (``ConfigError`` names it as ``buffer.<option>``)."""
        if isinstance(self.her, dict):  # Hydra/OmegaConf may hand a plain mapping
            self.her = HERConfig(**self.her)
        check_domains(self, "buffer", BUFFER_DOMAINS)


HER_DOMAINS: dict[str, Domain] = {
    "strategy": OneOf(STRATEGIES),
    "ratio": Range(low=0, high=1, note="0 disables HER"),
    "rarity_draws": Range(low=1, integer=True, note="1 = plain HER"),
    "rare_fraction": Range(low=0, high=1, note="0 = uniform sampling"),
}
"""The domain of each ``HERConfig`` field (``sacglam.validate``)."""

BUFFER_DOMAINS: dict[str, Domain] = {
    "capacity": COUNT,  # (and >= env.num_envs: TrainConfig checks it, it needs the env group)
    "n_step": COUNT,
    "gamma": PROBABILITY,
    "device": Device(auto=True),
    "max_obs_tokens": COUNT,
    "max_goal_tokens": COUNT,
    "max_cands": COUNT,
    "max_cand_tokens": COUNT,
    "max_goals": COUNT,
    "max_achieved": COUNT,
    "token_dtype": OneOf(TOKEN_DTYPES),
    "compile": Flag(),
    "native": OneOf(NATIVE_MODES),
}
"""The domain of each ``BufferConfig`` field but ``her`` (``sacglam.validate``)."""

__all__ = ["BUFFER_DOMAINS", "HER_DOMAINS", "NATIVE_MODES", "STRATEGIES", "TOKEN_DTYPES", "BufferConfig", "HERConfig",
           "Strategy"]
