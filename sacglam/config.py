"""Typed configuration: dataclasses registered in Hydra's ConfigStore (a misspelt override is an error naming the key).

Each module owns the dataclass of its own options (``BufferConfig`` in buffer.py, ``SACConfig`` in sac.py, ...);
this module adds the options of the loop itself and composes them into ``TrainConfig``, the schema of
``conf/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sacglam.agent import AgentConfig
from sacglam.algos.eto.dpo import ETOConfig
from sacglam.algos.ppo.learner import PPOConfig
from sacglam.algos.sac.learner import SACConfig
from sacglam.checkpoint import CheckpointConfig
from sacglam.curriculum import CurriculumConfig
from sacglam.logging import LoggerConfig
from sacglam.models import ModelConfig
from sacglam.relabel import RelabelConfig, RuleConfig
from sacglam.replay.buffer import BufferConfig

ALGOS: dict[str, type] = {"sac": SACConfig, "ppo": PPOConfig, "eto": ETOConfig}
"""``algo.name`` -> the schema of the ``algo`` group (each ``conf/algo/*.yaml`` extends ``<name>_schema``)."""


@dataclass
class EnvConfig:
    """Which environment to train in and how many run at once."""

    id: str = "sacglam/PlaygroundText-v0"  # a gymnasium id registered by `envs` (sacglam/...-v0)
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments of the env
    num_envs: int = 16  # parallel environments stepped together
    vector: str = "sync"  # sync | subprocess (one worker process per env)
    eval_kwargs: dict[str, Any] = field(default_factory=dict)  # overrides of `kwargs` for evaluation envs
    heldout_kwargs: dict[str, Any] = field(default_factory=dict)  # if set, also evaluate with these overrides
    corpus_episodes: int = 200  # random episodes whose text builds the tiny model's tokenizer
    # Rules over a step's text -> achieved goals (relabel.source=rule, and the llm source's rule verifier).
    rules: list[RuleConfig] = field(default_factory=list)


@dataclass
class PromptConfig:
    """How a state becomes a prompt. Token limits are the buffer's (``buffer.max_*_tokens``, ``buffer.max_cands``)."""

    template: str = "Goal: {goal}\nObservation: {obs}\nAction:"  # {goal} then {obs}, each exactly once
    obs_truncation: str = "left"  # an observation over buffer.max_obs_tokens: left (keep the end) | right | error
    chat: bool = False  # wrap the template (as the user turn) in the tokenizer's chat template; actions = the answer
    system: str | None = None  # chat system message (null: the chat template's own default)
    list_actions: bool = False  # list the candidate actions after the observation, as GLAM does
    actions_format: str = "\nPossible actions: {actions}"  # how they are listed ({actions}: joined by ", ")
    action_sep: str | None = None  # text between prompt and action (null: " ", or "" after a chat generation prompt)


@dataclass
class EvalConfig:
    """Evaluation on held-out seeds (and held-out objects where the env has them)."""

    every: int = 5000  # env steps between evaluations (0 = only at the end)
    episodes_per_category: int = 32  # episodes per goal category, split over the eval envs
    num_envs: int = 16  # parallel evaluation envs
    sample: bool = False  # also evaluate the sampled (stochastic) policy
    seed: int = 1_000_000  # evaluation seeds start here (training seeds start at `seed`)


@dataclass
class TrainConfig:
    """The whole run. ``python train.py key=value`` overrides any field."""

    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    # SACConfig | PPOConfig | ETOConfig: chosen by the algo group (conf/algo/*.yaml, each extending <name>_schema),
    # so a misspelt algo.* key is still an error naming it.
    algo: Any = MISSING
    buffer: BufferConfig = field(default_factory=BufferConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)  # where achieved goals come from
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)  # goal categories: uniform | alp
    seed: int = 0  # seeds envs, model init, sampling
    total_env_steps: int = 200_000  # stop after this many env steps (summed over envs)
    time_limit_min: float = 0.0  # also stop after this many wall-clock minutes (0 = no limit)
    batch_size: int = 32  # transitions per update
    replay_ratio: float = 4.0  # transitions sampled per env step: updates per vector step = ratio * N / batch
    learning_starts: int = 1000  # transitions in the buffer before the first update
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    threads: int = 0  # torch CPU threads (0 = torch's default)
    resume: str = "never"  # never | auto (newest complete checkpoint of the run folder) | a checkpoint file or folder

    def __post_init__(self) -> None:
        if not self.resume:
            raise ValueError('resume is empty; use "never", "auto" or a checkpoint path')
        if self.curriculum.kind != "uniform" and getattr(self.algo, "name", None) == "eto":
            # ETO explores a fixed list of task seeds per round (eto.py), with no episode stream to reweight.
            raise ValueError(f"curriculum={self.curriculum.kind} reweights the goal categories of the training "
                             "episodes, which algo=eto does not draw (it explores fixed task seeds); use "
                             "curriculum=uniform with ETO")


def register_configs() -> None:
    """Register the schema so that ``conf/config.yaml`` (defaults: base_config) is validated against it."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    for name, schema in ALGOS.items():
        cs.store(group="algo", name=f"{name}_schema", node=schema)
