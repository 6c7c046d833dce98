"""Typed configuration: dataclasses registered in Hydra's ConfigStore (a misspelt override is an error naming the key).

``TrainConfig`` is the schema of ``conf/config.yaml``. The options live in light modules (standard library only: no
torch, numpy, transformers, peft or accelerate, and no module that imports them), so composing or validating a
config never loads a model library (``tests/test_import_rules.py`` checks it):

* this module: the options of the shared components (agent, model, checkpoints, logger, curriculum, relabelling,
  env, prompt, evaluation) and of the loop itself. Each heavy module that reads a section imports its dataclass from
  here and re-exports it (``from sacglam.agent import AgentConfig`` keeps working);
* ``sacglam.algos.<name>.config``: the options of each algorithm (``SACConfig``, ``PPOConfig``, ``ETOConfig``), the
  ``algo`` group's schemas;
* ``sacglam.replay.config``: the replay buffer's options (``BufferConfig`` with ``HERConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sacglam.algos.eto.config import ETOConfig
from sacglam.algos.ppo.config import PPOConfig
from sacglam.algos.sac.config import SACConfig
from sacglam.replay.config import BufferConfig

ALGOS: dict[str, type] = {"sac": SACConfig, "ppo": PPOConfig, "eto": ETOConfig}
"""``algo.name`` -> the schema of the ``algo`` group (each ``conf/algo/*.yaml`` extends ``<name>_schema``)."""

TINY = "tiny"
"""``model.name`` of the built-in tiny model (``sacglam.models``)."""
KINDS = ("uniform", "alp")
"""``curriculum.kind`` values (``sacglam.curriculum``)."""
SOURCES = ("oracle", "rule", "llm")
"""``relabel.source`` values: where achieved goals come from (``sacglam.relabel``)."""
JUDGES = ("model", "rule")
"""``relabel.llm.judge`` values: what verifies the llm source's proposals (``sacglam.relabel``)."""


# ---------------------------------------------------------------------------------------------------------------------
# the shared components (each heavy module imports its section from here)


@dataclass
class AgentConfig:
    """Options of the actor, the critics and the target network."""

    n_q: int = 2  # number of critics; the targets and the actor use the min over them (twin Q, 1 = published)
    critic_hidden: list[int] = field(default_factory=lambda: [1024, 1024])  # hidden sizes of each Q head's MLP
    temperature: float = 1.0  # policy temperature: pi = softmax(score / temperature) over the candidates
    length_norm: bool = False  # score a candidate by its mean (not summed) token log-prob
    separate_adapter: bool = False  # the critic reads its own LoRA adapter instead of sharing the actor's (peft only)


@dataclass
class LoraConfig:
    """LoRA adapter options (``peft``)."""

    enabled: bool = True  # False = full fine-tuning of every weight (better for the tiny random-init model)
    r: int = 16  # adapter rank (published: 16)
    alpha: int = 32  # scaling numerator: the update is scaled by alpha / r (published: 32)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] | None = None  # module name suffixes; None = models.LORA_TARGETS for the model's family
    top_layers: int = 0  # > 0: adapters on the last N blocks only (the backward pass then stops below them)


@dataclass
class ModelConfig:
    """Which model to load and how."""

    # "tiny", "smollm2-135m", an alias in models.ALIASES, a local folder, or a hub id in the local cache
    name: str = TINY
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16" or "float16"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    attn_implementation: str = "sdpa"  # "sdpa" or "eager" (both work with the shared-prefix scorer's block mask)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # --- the built-in tiny model (name="tiny") ---
    hidden: int = 64  # hidden size
    layers: int = 2  # decoder layers
    heads: int = 2  # attention heads (hidden must be divisible by heads)
    intermediate: int = 128  # MLP width
    max_positions: int = 1024  # longest prompt + candidate the model accepts (rotary: no learned table)
    init_seed: int = 0  # weights are initialised from this seed, without touching the global RNG
    tokenizer_cache: str = "~/.cache/sacglam/tokenizers"  # where tiny tokenizers are kept, one folder per corpus


@dataclass
class CheckpointConfig:
    """When to save checkpoints and how many to keep (where to resume from is the run's top-level ``resume``)."""

    every: int = 10_000  # save every this many env steps (summed over the N parallel envs); 0 disables checkpoints
    keep: int = 3  # keep only the newest `keep` checkpoints of the run (oldest pruned first); 0 keeps all

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(
                f"CheckpointConfig.every={self.every} is negative; use a step interval > 0, or 0 to disable."
            )
        if self.keep < 0:
            raise ValueError(
                f"CheckpointConfig.keep={self.keep} is negative; use K >= 1 to keep the last K, or 0 for all."
            )


@dataclass
class LoggerConfig:
    """Where metrics go.

    The environment variable ``WANDB_MODE=disabled`` overrides ``wandb_mode`` (so test runs never start wandb).
    """

    wandb_mode: str = "offline"  # offline (no account, sync later with `wandb sync`) | online | disabled
    project: str = "sacglam"  # wandb project
    entity: str | None = None  # wandb entity (user or team); None = the account's default
    run_name: str | None = None  # wandb run name; None = wandb's generated name
    group: str | None = None  # wandb group (the runs of one sweep share one; e.g. experiment=sweep_sac_her sets it)
    jsonl: bool = True  # write run_dir/metrics.jsonl (needed for the success plot)
    progress: bool = True  # tqdm progress bar on the console
    log_every: int = 1000  # env steps between training-metric logs (see RunLogger.should_log)
    episodes: bool = False  # write every finished training episode as text to run_dir/episodes/ (gzip JSONL)
    episodes_max_mb: float = 64.0  # start a new episode-log file once the current one holds this many MB


@dataclass
class CurriculumConfig:
    """How the goal category of each training episode is chosen (``conf/curriculum/*.yaml``)."""

    kind: str = "uniform"  # uniform (the env's own draw, as before) | alp (absolute learning progress: curriculum.py)
    window: int = 50  # outcomes per sliding window; ALP_c needs 2 * window outcomes of category c
    eps_start: float = 1.0  # uniform share of p at the first episode
    eps_end: float = 0.2  # uniform share of p from anneal_episodes on
    anneal_episodes: int = 2000  # training episodes (summed over ranks) over which eps goes linearly to eps_end

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"curriculum.kind={self.kind!r} is unknown; use one of {list(KINDS)}")
        if self.window < 1:
            raise ValueError(f"curriculum.window={self.window} must be at least 1 outcome")
        for name in ("eps_start", "eps_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"curriculum.{name}={getattr(self, name)} is a probability in [0, 1]")
        if self.anneal_episodes < 0:
            raise ValueError(f"curriculum.anneal_episodes={self.anneal_episodes} is negative; use 0 for eps_end "
                             "from the start")


@dataclass
class RuleConfig:
    """One rule: ``pattern`` (a Python regular expression, ``re.MULTILINE``) searched in a step's transition text;
    each match achieves ``goal`` formatted with the match's named groups (lower-cased when ``lower``)."""

    pattern: str = ""
    goal: str = ""
    lower: bool = False


@dataclass
class LLMRelabelConfig:
    """The ``llm`` source: a proposer model and a verifier."""

    model: str = "smollm2-135m"  # any model.name load_model accepts (a local folder, an alias, smollm2-135m)
    judge: str = "model"  # model (a yes/no judge model) | rule (the rules verify)
    judge_model: str | None = None  # null: the proposer's model judges too
    threshold: float = 0.5  # the judge's P(Yes) needed to accept a proposal
    max_goals: int = 16  # candidate goals scored per step (the best-ranked by word overlap)
    chat: bool = False  # wrap prompts in the tokenizer's chat template (when it has one)
    batch_size: int = 32  # prompts per forward pass
    background: bool = False  # judge on a separate thread (the collector does not wait; results land later)
    max_pending: int = 64  # background only: episodes ending while this many wait are not judged (0 = no limit)
    device: str = "cpu"  # where the judge model runs
    dtype: str = "float32"


@dataclass
class RelabelConfig:
    """``relabel.source`` picks where achieved goals come from (see ``sacglam.relabel``'s docstring)."""

    source: str = "oracle"  # oracle | rule | llm
    rules: list[RuleConfig] | None = None  # null: the env's rules (env.rules)
    llm: LLMRelabelConfig = field(default_factory=LLMRelabelConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"relabel.source must be one of {SOURCES}, got {self.source!r}")
        if isinstance(self.llm, dict):
            self.llm = LLMRelabelConfig(**self.llm)
        if self.llm.judge not in JUDGES:
            raise ValueError(f"relabel.llm.judge must be one of {JUDGES}, got {self.llm.judge!r}")
        if not 0.0 <= self.llm.threshold <= 1.0:
            raise ValueError(f"relabel.llm.threshold must be in [0, 1], got {self.llm.threshold}")


# ---------------------------------------------------------------------------------------------------------------------
# the run


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
    # Imported here: the dataclasses need only omegaconf, so the modules that read their options never load hydra.
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    for name, schema in ALGOS.items():
        cs.store(group="algo", name=f"{name}_schema", node=schema)


__all__ = [
    "ALGOS",
    "JUDGES",
    "KINDS",
    "SOURCES",
    "TINY",
    "AgentConfig",
    "BufferConfig",
    "CheckpointConfig",
    "CurriculumConfig",
    "ETOConfig",
    "EnvConfig",
    "EvalConfig",
    "LLMRelabelConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "PPOConfig",
    "PromptConfig",
    "RelabelConfig",
    "RuleConfig",
    "SACConfig",
    "TrainConfig",
    "register_configs",
]
