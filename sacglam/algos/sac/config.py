"""The options of the SAC update (``algo=sac``, ``conf/algo/sac.yaml``), light enough for the Hydra schema.

This module imports only the standard library, so ``sacglam.config`` can compose the schema without torch;
``sacglam.algos.sac.learner`` imports :class:`SACConfig` from here and re-exports it. Every option is checked against
``SAC_DOMAINS`` when the config is built (``sacglam.validate``); ``batch_size`` divisible by ``grad_accum`` needs the
top level and is checked by ``TrainConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sacglam.validate import COUNT, POSITIVE, PROBABILITY, Domain, Flag, OneOf, Range, check_domains

ALPHA_MODES: tuple[str, ...] = ("auto", "fixed")


@dataclass
class SACConfig:
    """Options of the SAC update. gamma and n-step returns are folded into ``Batch.reward/discount`` by the buffer.

    Defaults follow docs/design/CALIBRATION.md (tiny model on CPU); the published SAC-GLAM values are lr 1e-4 (actor,
    critic), 1e-3 (alpha), alpha 0.05 and no hindsight term (``hindsight_bc_coef = 0``).
    """

    name: str = "sac"  # which algorithm train.py runs (sac | ppo)
    lr_actor: float = 1e-3  # Adam lr of the policy trunk (LoRA actor adapter, or the whole model)
    lr_critic: float = 1e-3  # Adam lr of the critic-only parameters (Q heads, critic adapter)
    lr_alpha: float = 3e-3  # Adam lr of log_alpha (alpha_mode=auto)
    alpha_mode: str = "auto"  # "auto": learn alpha towards the entropy target; "fixed": keep alpha_init
    alpha_init: float = 0.01  # initial entropy temperature (0.1 drowned a reward of 1 in the entropy bonus)
    alpha_min: float = 1e-3  # floor on the learned alpha (log_alpha clamped after each step); 0 = no floor
    target_entropy_ratio: float = 0.6  # H_target(s) = ratio * log |A(s)| per state
    tau: float = 0.005  # Polyak weight of the target update after every critic step
    critic_warmup_updates: int = 10  # first updates train the critic-only parameters only
    grad_clip: float = 1.0  # max global grad norm per parameter group (actor, critic); 0 = no clipping
    grad_accum: int = 1  # micro-batches per update (the batch size must be divisible by it)
    huber: bool = False  # Huber (smooth L1) critic loss instead of the squared error
    hindsight_bc_coef: float = 1.0  # weight of -log pi(a|s,g') on HER-relabelled transitions; 0 = pure SAC-GLAM
    hindsight_bc_within_limit: bool = True  # only relabels achieved within the goal's step limit (t'-t+1 <= limit)
    hindsight_bc_discount: float = 0.0  # > 0: weight each hindsight term by this ** (t' - t) (e.g. gamma); 0 = off

    def __post_init__(self) -> None:
        """Check every option against ``SAC_DOMAINS`` (``ConfigError`` names it as ``algo.<option>``)."""
        check_domains(self, "algo", SAC_DOMAINS)


SAC_DOMAINS: dict[str, Domain] = {
    "name": OneOf(("sac",)),
    "lr_actor": POSITIVE,
    "lr_critic": POSITIVE,
    "lr_alpha": POSITIVE,
    "alpha_mode": OneOf(ALPHA_MODES),
    "alpha_init": POSITIVE,
    "alpha_min": Range(low=0, note="0 = no floor"),
    "target_entropy_ratio": PROBABILITY,  # the target is a share of the uniform policy's entropy log |A(s)|
    "tau": PROBABILITY,
    "critic_warmup_updates": Range(low=0, integer=True, note="0 = no critic-only warm-up"),
    "grad_clip": Range(low=0, finite=False, note="0 = no clipping"),
    "grad_accum": COUNT,
    "huber": Flag(),
    "hindsight_bc_coef": Range(low=0, note="0 = pure SAC-GLAM"),
    "hindsight_bc_within_limit": Flag(),
    "hindsight_bc_discount": Range(low=0, high=1, note="0 = off"),
}
"""The domain of each ``SACConfig`` field (``sacglam.validate``)."""


__all__ = ["ALPHA_MODES", "SAC_DOMAINS", "SACConfig"]
