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

Every option's domain is declared in a table beside its dataclass (``<SECTION>_DOMAINS``: counts, fractions, learning
rates, the allowed strings) and checked in ``__post_init__`` (``sacglam.validate``), so a bad value is refused when
the typed config is built, with an error naming its command-line key; the rules between options (divisibility, one
option needing another) are checked in the same ``__post_init__`` methods, those across groups in ``TrainConfig``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sacglam.algos.eto.config import ETOConfig
from sacglam.algos.ppo.config import PPOConfig
from sacglam.algos.sac.config import SACConfig
from sacglam.replay.config import BufferConfig
from sacglam.validate import (
    COUNT,
    DTYPES,
    POSITIVE,
    PROBABILITY,
    SEED_MAX,
    ConfigError,
    Device,
    Domain,
    Each,
    Flag,
    Free,
    Maybe,
    OneOf,
    Range,
    Text,
    check_divides,
    check_domains,
    count_or_off,
    refuse,
)

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
ATTENTION = ("sdpa", "eager")
"""``model.attn_implementation`` values (both work with the shared-prefix scorer's block mask)."""
WANDB_MODES = ("offline", "online", "disabled")
"""``logger.wandb_mode`` values."""
VECTOR_MODES = ("sync", "subprocess")
"""``env.vector`` values (``envs.vector.make_vector_env``)."""
OBS_TRUNCATION = ("left", "right", "error")
"""``prompt.obs_truncation`` values (``sacglam.prompting.PromptCodec``)."""


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

    def __post_init__(self) -> None:
        check_domains(self, "agent", AGENT_DOMAINS)


AGENT_DOMAINS: dict[str, Domain] = {
    "n_q": COUNT,
    "critic_hidden": Each(COUNT),  # [] = a linear head
    "temperature": POSITIVE,
    "length_norm": Flag(),
    "separate_adapter": Flag(),
}
"""The domain of each ``AgentConfig`` field (``sacglam.validate``)."""


@dataclass
class LoraConfig:
    """LoRA adapter options (``peft``)."""

    enabled: bool = True  # False = full fine-tuning of every weight (better for the tiny random-init model)
    r: int = 16  # adapter rank (published: 16)
    alpha: int = 32  # scaling numerator: the update is scaled by alpha / r (published: 32)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] | None = None  # module name suffixes; None = models.LORA_TARGETS for the model's family
    top_layers: int = 0  # > 0: adapters on the last N blocks only (the backward pass then stops below them)

    def __post_init__(self) -> None:
        check_domains(self, "model.lora", LORA_DOMAINS)


LORA_DOMAINS: dict[str, Domain] = {
    "enabled": Flag(),
    "r": COUNT,
    "alpha": COUNT,
    "dropout": Range(low=0, high=1, high_open=True),
    "target_modules": Maybe(Each(Text(), nonempty=True)),
    "top_layers": count_or_off("0 = every block"),
}
"""The domain of each ``LoraConfig`` field (``sacglam.validate``)."""


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

    def __post_init__(self) -> None:
        """Check every option against ``MODEL_DOMAINS``; the tiny model's hidden size must divide by its heads, and
        its LoRA ``top_layers`` not exceed its layers."""
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        check_domains(self, "model", MODEL_DOMAINS)
        if self.name != TINY:  # (another model's shape is its own: models.py checks lora.top_layers against it)
            return
        if self.hidden % self.heads:
            raise ConfigError(f"model.hidden={self.hidden} must be divisible by model.heads={self.heads}: each "
                              "attention head of the tiny model takes an equal share of the hidden size")
        if self.lora.enabled and self.lora.top_layers > self.layers:
            raise refuse(self.lora, "model.lora", "top_layers", f"<= model.layers={self.layers} (the tiny model's "
                         "blocks), or 0 for every block")


MODEL_DOMAINS: dict[str, Domain] = {
    "name": Text("a model: tiny, smollm2-135m, an alias, a local folder or a cached hub id"),
    "dtype": OneOf(DTYPES),
    "gradient_checkpointing": Flag(),
    "attn_implementation": OneOf(ATTENTION),
    "hidden": COUNT,
    "layers": COUNT,
    "heads": COUNT,
    "intermediate": COUNT,
    "max_positions": COUNT,
    "init_seed": Range(low=-(2**63), high=2**64 - 1, integer=True, note="torch's seed range"),
    "tokenizer_cache": Text("a folder"),
}
"""The domain of each ``ModelConfig`` field but ``lora`` (``sacglam.validate``)."""


@dataclass
class CheckpointConfig:
    """When to save checkpoints and how many to keep (where to resume from is the run's top-level ``resume``)."""

    every: int = 10_000  # save every this many env steps (summed over the N parallel envs); 0 disables checkpoints
    keep: int = 3  # keep only the newest `keep` checkpoints of the run (oldest pruned first); 0 keeps all
    # with a frozen base (LoRA): save the trainable weights and the base's name and fingerprint, not the base weights
    # (sacglam.checkpoint.agent_state); false saves every weight. Full fine-tuning saves every weight either way
    lean: bool = True
    # a checkpoint that cannot be written (full disk, quota, I/O error): "stop" the run naming the file and the free
    # space, or "continue" training with a warning (the previous complete checkpoint stays intact either way)
    on_error: str = "stop"

    def __post_init__(self) -> None:
        check_domains(self, "checkpoint", CHECKPOINT_DOMAINS)


CHECKPOINT_DOMAINS: dict[str, Domain] = {
    "every": count_or_off("0 disables checkpoints"),
    "keep": count_or_off("0 keeps all"),
    "lean": Flag(),
    "on_error": OneOf(("stop", "continue")),
}
"""The domain of each ``CheckpointConfig`` field (``sacglam.validate``)."""


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

    def __post_init__(self) -> None:
        check_domains(self, "logger", LOGGER_DOMAINS)


LOGGER_DOMAINS: dict[str, Domain] = {
    "wandb_mode": OneOf(WANDB_MODES),
    "project": Text(),
    "entity": Free("a wandb name, or null"),
    "run_name": Free("a wandb name, or null"),
    "group": Free("a wandb name, or null"),
    "jsonl": Flag(),
    "progress": Flag(),
    "log_every": count_or_off("0 = every vector step"),
    "episodes": Flag(),
    "episodes_max_mb": POSITIVE,
}
"""The domain of each ``LoggerConfig`` field (``sacglam.validate``)."""


@dataclass
class CurriculumConfig:
    """How the goal category of each training episode is chosen (``conf/curriculum/*.yaml``)."""

    kind: str = "uniform"  # uniform (the env's own draw, as before) | alp (absolute learning progress: curriculum.py)
    window: int = 50  # outcomes per sliding window; ALP_c needs 2 * window outcomes of category c
    eps_start: float = 1.0  # uniform share of p at the first episode
    eps_end: float = 0.2  # uniform share of p from anneal_episodes on
    anneal_episodes: int = 2000  # training episodes (summed over ranks) over which eps goes linearly to eps_end

    def __post_init__(self) -> None:
        check_domains(self, "curriculum", CURRICULUM_DOMAINS)


CURRICULUM_DOMAINS: dict[str, Domain] = {
    "kind": OneOf(KINDS),
    "window": COUNT,
    "eps_start": PROBABILITY,
    "eps_end": PROBABILITY,
    "anneal_episodes": count_or_off("0 = eps_end from the start"),
}
"""The domain of each ``CurriculumConfig`` field (``sacglam.validate``)."""


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

    def __post_init__(self) -> None:
        check_domains(self, "relabel.llm", LLM_RELABEL_DOMAINS)


LLM_RELABEL_DOMAINS: dict[str, Domain] = {
    "model": Text("a model: an alias, a local folder or smollm2-135m"),
    "judge": OneOf(JUDGES),
    "judge_model": Maybe(Text("a model")),
    "threshold": PROBABILITY,
    "max_goals": COUNT,
    "chat": Flag(),
    "batch_size": COUNT,
    "background": Flag(),
    "max_pending": count_or_off("0 = no limit"),
    "device": Device(auto=False),
    "dtype": OneOf(DTYPES),
}
"""The domain of each ``LLMRelabelConfig`` field (``sacglam.validate``)."""


@dataclass
class RelabelConfig:
    """``relabel.source`` picks where achieved goals come from (see ``sacglam.relabel``'s docstring)."""

    source: str = "oracle"  # oracle | rule | llm
    rules: list[RuleConfig] | None = None  # null: the env's rules (env.rules)
    llm: LLMRelabelConfig = field(default_factory=LLMRelabelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.llm, dict):
            self.llm = LLMRelabelConfig(**self.llm)
        check_domains(self, "relabel", RELABEL_DOMAINS)


RELABEL_DOMAINS: dict[str, Domain] = {
    "source": OneOf(SOURCES),
    "rules": Free("null, or rules checked when they are compiled (sacglam.relabel)"),
}
"""The domain of each ``RelabelConfig`` field but ``llm`` (``sacglam.validate``)."""


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
    # Episodes per env (training and evaluation; half by the env's expert) whose text is checked against the
    # buffer's token widths before the run starts (sacglam/run/sizes.py); 0 = no start-up check.
    preflight_episodes: int = 8
    # Rules over a step's text -> achieved goals (relabel.source=rule, and the llm source's rule verifier).
    rules: list[RuleConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_domains(self, "env", ENV_DOMAINS)


ENV_DOMAINS: dict[str, Domain] = {
    "id": Text("a registered env id (sacglam/...-v0)"),
    "kwargs": Free("the env's own keyword arguments, checked by the env"),
    "num_envs": COUNT,
    "vector": OneOf(VECTOR_MODES),
    "eval_kwargs": Free("the env's own keyword arguments, checked by the env"),
    "heldout_kwargs": Free("the env's own keyword arguments, checked by the env"),
    "corpus_episodes": count_or_off("0 = the template's and the goal lists' words only"),
    "preflight_episodes": count_or_off("0 = no start-up check of the token widths"),
    "rules": Free("rules checked when they are compiled (sacglam.relabel)"),
}
"""The domain of each ``EnvConfig`` field (``sacglam.validate``)."""


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

    def __post_init__(self) -> None:
        """Check every option against ``PROMPT_DOMAINS``, and the format strings' fields."""
        check_domains(self, "prompt", PROMPT_DOMAINS)
        t = self.template
        if t.count("{goal}") != 1 or t.count("{obs}") != 1 or t.index("{goal}") > t.index("{obs}"):
            raise refuse(self, "prompt", "template", "a format string holding {goal} then {obs}, each exactly once",
                         "is not allowed")
        if self.list_actions and self.actions_format.count("{actions}") != 1:
            raise refuse(self, "prompt", "actions_format", "a format string holding {actions} exactly once (with "
                         "prompt.list_actions=true)", "is not allowed")


PROMPT_DOMAINS: dict[str, Domain] = {
    "template": Text(),
    "obs_truncation": OneOf(OBS_TRUNCATION),
    "chat": Flag(),
    "system": Free("any text, or null"),
    "list_actions": Flag(),
    "actions_format": Free("any text (read with prompt.list_actions=true)"),
    "action_sep": Free("any text, or null"),
}
"""The domain of each ``PromptConfig`` field (``sacglam.validate``)."""


@dataclass
class EvalConfig:
    """Evaluation on held-out seeds (and held-out objects where the env has them)."""

    every: int = 5000  # env steps between evaluations (0 = only at the end)
    episodes_per_category: int = 32  # episodes per goal category, split over the eval envs
    num_envs: int = 16  # parallel evaluation envs
    sample: bool = False  # also evaluate the sampled (stochastic) policy
    seed: int = 1_000_000  # evaluation seeds start here (training seeds start at `seed`)

    def __post_init__(self) -> None:
        check_domains(self, "eval", EVAL_DOMAINS)


EVAL_DOMAINS: dict[str, Domain] = {
    "every": count_or_off("0 = only at the end"),
    "episodes_per_category": COUNT,
    "num_envs": COUNT,
    "sample": Flag(),
    "seed": Range(low=0, integer=True, note="env reset seeds are non-negative"),
}
"""The domain of each ``EvalConfig`` field (``sacglam.validate``)."""


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
        """Check the top-level options against ``TRAIN_DOMAINS`` and the rules across groups (each group checked
        its own options when it was built)."""
        check_domains(self, "", TRAIN_DOMAINS)
        if isinstance(self.algo, SACConfig):
            check_divides(("algo.grad_accum", self.algo.grad_accum), ("batch_size", self.batch_size),
                          "every update splits its batch into equal micro-batches")
            if self.buffer.capacity < self.env.num_envs:
                raise refuse(self.buffer, "buffer", "capacity", f">= env.num_envs={self.env.num_envs} (each env "
                             "keeps capacity // env.num_envs rows)")
        if self.curriculum.kind != "uniform" and getattr(self.algo, "name", None) == "eto":
            # ETO explores a fixed list of task seeds per round (eto.py), with no episode stream to reweight.
            raise ValueError(f"curriculum={self.curriculum.kind} reweights the goal categories of the training "
                             "episodes, which algo=eto does not draw (it explores fixed task seeds); use "
                             "curriculum=uniform with ETO")


TRAIN_DOMAINS: dict[str, Domain] = {
    "seed": Range(low=0, high=SEED_MAX, integer=True, note="numpy's seed range"),
    "total_env_steps": count_or_off("0 = no training step: the initial model is evaluated and saved"),
    "time_limit_min": Range(low=0, finite=False, note="0 = no limit"),
    "batch_size": COUNT,
    "replay_ratio": Range(low=0, note="0 = no update"),
    "learning_starts": COUNT,  # (0 would sample before any episode has finished: the buffer samples finished ones)
    "device": Device(auto=True),
    "threads": count_or_off("0 = torch's default"),
    "resume": Text('never, auto or a checkpoint file or folder'),
}
"""The domain of each top-level ``TrainConfig`` option (the groups, ``algo`` included, check their own)."""


def register_configs() -> None:
    """Register the schema so that ``conf/config.yaml`` (defaults: base_config) is validated against it."""
    # Imported here: the dataclasses need only omegaconf, so the modules that read their options never load hydra.
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    for name, schema in ALGOS.items():
        cs.store(group="algo", name=f"{name}_schema", node=schema)


__all__ = [
    "AGENT_DOMAINS",
    "ALGOS",
    "ATTENTION",
    "CHECKPOINT_DOMAINS",
    "CURRICULUM_DOMAINS",
    "ENV_DOMAINS",
    "EVAL_DOMAINS",
    "JUDGES",
    "KINDS",
    "LLM_RELABEL_DOMAINS",
    "LOGGER_DOMAINS",
    "LORA_DOMAINS",
    "MODEL_DOMAINS",
    "OBS_TRUNCATION",
    "PROMPT_DOMAINS",
    "RELABEL_DOMAINS",
    "SOURCES",
    "TINY",
    "TRAIN_DOMAINS",
    "VECTOR_MODES",
    "WANDB_MODES",
    "AgentConfig",
    "BufferConfig",
    "CheckpointConfig",
    "ConfigError",
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
