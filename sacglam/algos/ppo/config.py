"""The options of PPO-GLAM (``algo=ppo``, ``conf/algo/ppo.yaml``) and the check that refuses replay-buffer options
with it, light enough for the Hydra schema.

This module imports only the standard library, so ``sacglam.config`` can compose the schema without torch;
``sacglam.algos.ppo.learner`` imports these names from here and re-exports them. Every option is checked against
``PPO_DOMAINS`` when the config is built (``sacglam.validate``). That ``algo.minibatch_size`` divides the rollout
(``env.num_envs x algo.rollout_steps``) depends on the number of processes (each takes a share of every minibatch),
so ``PPOUpdater`` checks it for its process's share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sacglam.validate import (
    COUNT,
    NONNEGATIVE,
    POSITIVE,
    PROBABILITY,
    ConfigError,
    Domain,
    Each,
    Flag,
    OneOf,
    Range,
    check_divides,
    check_domains,
)

VALUE_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "relu", "tanh")


@dataclass
class PPOConfig:
    """Options of PPO-GLAM. Defaults suit the tiny model on CPU (``conf/algo/ppo.yaml`` and the sweep in
    docs/results.md); GLAM's published values are in ``conf/algo/ppo_paper.yaml``."""

    name: str = "ppo"  # which algorithm train.py runs (sac | ppo)
    lr: float = 1e-3  # Adam lr of the trunk (LoRA adapter, or the whole model) and the value head
    adam_eps: float = 1e-5  # Adam epsilon (GLAM: 1e-5)
    gamma: float = 0.99  # discount of GAE and the returns
    gae_lambda: float = 0.95  # GAE lambda (GLAM: 0.99)
    rollout_steps: int = 32  # vector steps per rollout: each update sees env.num_envs x rollout_steps transitions
    epochs: int = 4  # passes over the rollout per update
    minibatch_size: int = 64  # transitions per optimizer step; must divide env.num_envs x rollout_steps
    grad_accum: int = 1  # equal micro-batches per minibatch (memory); must divide minibatch_size
    clip_coef: float = 0.2  # ratio clip epsilon
    clip_value: float = 0.2  # value clip around the acting-time value (max of clipped and unclipped); 0 = unclipped
    ent_coef: float = 0.01  # weight of the candidate-distribution entropy bonus
    vf_coef: float = 0.5  # weight of the value loss
    max_grad_norm: float = 0.5  # global gradient-norm clip over all trained parameters; 0 = none
    norm_adv: bool = True  # normalise advantages (mean 0, std 1) over the whole rollout, once per update
    reward_scale: float = 1.0  # rewards are multiplied by this before GAE (GLAM: 20)
    target_kl: float = 0.0  # stop the epochs of an update once the mean approx KL of an epoch exceeds this; 0 = off
    value_hidden: list[int] = field(default_factory=lambda: [1024, 1024])  # value head MLP (GLAM: 1024, 1024)
    value_activation: str = "sigmoid"  # value head activation: sigmoid (GLAM) | relu | tanh

    def __post_init__(self) -> None:
        """Check every option against ``PPO_DOMAINS``, and that ``grad_accum`` divides ``minibatch_size``
        (``ConfigError`` names the option as ``algo.<option>``)."""
        check_domains(self, "algo", PPO_DOMAINS)
        check_divides(("algo.grad_accum", self.grad_accum), ("algo.minibatch_size", self.minibatch_size),
                      "the micro-batches must be equal for the accumulated gradient to equal the minibatch's")


PPO_DOMAINS: dict[str, Domain] = {
    "name": OneOf(("ppo",)),
    "lr": POSITIVE,
    "adam_eps": POSITIVE,
    "gamma": PROBABILITY,
    "gae_lambda": PROBABILITY,
    "rollout_steps": COUNT,
    "epochs": COUNT,
    "minibatch_size": COUNT,
    "grad_accum": COUNT,
    "clip_coef": POSITIVE,
    "clip_value": Range(low=0, note="0 = unclipped"),
    "ent_coef": NONNEGATIVE,
    "vf_coef": NONNEGATIVE,
    "max_grad_norm": Range(low=0, finite=False, note="0 = no clipping"),
    "norm_adv": Flag(),
    "reward_scale": POSITIVE,
    "target_kl": Range(low=0, finite=False, note="0 = off"),
    "value_hidden": Each(COUNT),  # [] = a linear value head
    "value_activation": OneOf(VALUE_ACTIVATIONS),
}
"""The domain of each ``PPOConfig`` field (``sacglam.validate``)."""


# Options only a replay buffer reads (train.py's top level and the buffer group): with algo=ppo, setting one on the
# command line is an error that names it, rather than an option silently ignored.
REPLAY_ONLY = ("replay_ratio", "learning_starts", "batch_size", "buffer.capacity", "buffer.n_step", "buffer.gamma",
               "buffer.her", "buffer.device", "buffer.native", "buffer.compile", "buffer.token_dtype",
               "buffer.max_goals", "buffer.max_achieved")


def check_on_policy(overrides: Sequence[str], her_ratio: float, rare_fraction: float) -> None:
    """Refuse replay options with PPO.

    Args:
        overrides: the command line's ``key=value`` overrides (Hydra's ``overrides.task``).
        her_ratio, rare_fraction: the composed ``buffer.her`` options (a preset may set them too).

    Raises:
        ConfigError: naming the first replay-only option found and PPO's own options.
    """
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if any(key == k or key.startswith(k + ".") for k in REPLAY_ONLY):
            raise ConfigError(
                f"{key} is a replay-buffer option, but algo=ppo is on-policy and never reads it; drop it. "
                "PPO's options: algo.minibatch_size (per optimizer step), algo.rollout_steps (a rollout is "
                "env.num_envs x algo.rollout_steps transitions), algo.gamma / algo.gae_lambda (discounting)."
            )
    for key, value in (("buffer.her.ratio", her_ratio), ("buffer.her.rare_fraction", rare_fraction)):
        if value > 0:
            raise ConfigError(f"{key}={value}: hindsight relabelling and rarity replay need a replay buffer, but "
                             "algo=ppo is on-policy; use buffer=on_policy (the algo's default)")


__all__ = ["PPO_DOMAINS", "REPLAY_ONLY", "VALUE_ACTIVATIONS", "PPOConfig", "check_on_policy"]
