"""Every option's domain is checked when the typed config is built (``sacglam.validate`` and the ``*_DOMAINS`` tables
beside each config dataclass): one bad value per validated option, the rules between options, every preset still
valid, and ``train.py`` refusing a bad value with a message instead of a traceback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sacglam.algos.eto.config import ETO_DOMAINS, ETOConfig
from sacglam.algos.ppo.config import PPO_DOMAINS, PPOConfig
from sacglam.algos.sac.config import SAC_DOMAINS, SACConfig
from sacglam.config import (
    AGENT_DOMAINS,
    CHECKPOINT_DOMAINS,
    CURRICULUM_DOMAINS,
    ENV_DOMAINS,
    EVAL_DOMAINS,
    LLM_RELABEL_DOMAINS,
    LOGGER_DOMAINS,
    LORA_DOMAINS,
    MODEL_DOMAINS,
    PROMPT_DOMAINS,
    RELABEL_DOMAINS,
    TRAIN_DOMAINS,
    AgentConfig,
    CheckpointConfig,
    CurriculumConfig,
    EnvConfig,
    EvalConfig,
    LLMRelabelConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    RelabelConfig,
    TrainConfig,
    register_configs,
)
from sacglam.replay.config import BUFFER_DOMAINS, HER_DOMAINS, BufferConfig, HERConfig
from sacglam.validate import ConfigError, Device, Domain, Each, Free, Maybe, Range, check_divides

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")
register_configs()

# (dataclass, its dotted path on the command line, its domain table): every config section of the schema.
SECTIONS: list[tuple[type, str, dict[str, Domain]]] = [
    (TrainConfig, "", TRAIN_DOMAINS), (EnvConfig, "env", ENV_DOMAINS), (ModelConfig, "model", MODEL_DOMAINS),
    (LoraConfig, "model.lora", LORA_DOMAINS), (AgentConfig, "agent", AGENT_DOMAINS),
    (BufferConfig, "buffer", BUFFER_DOMAINS), (HERConfig, "buffer.her", HER_DOMAINS),
    (PromptConfig, "prompt", PROMPT_DOMAINS), (LoggerConfig, "logger", LOGGER_DOMAINS),
    (CheckpointConfig, "checkpoint", CHECKPOINT_DOMAINS), (EvalConfig, "eval", EVAL_DOMAINS),
    (RelabelConfig, "relabel", RELABEL_DOMAINS), (LLMRelabelConfig, "relabel.llm", LLM_RELABEL_DOMAINS),
    (CurriculumConfig, "curriculum", CURRICULUM_DOMAINS),
    (SACConfig, "algo", SAC_DOMAINS), (PPOConfig, "algo", PPO_DOMAINS), (ETOConfig, "algo", ETO_DOMAINS),
]


def _row(option: str, bad: Any, fragment: str, algo: type = SACConfig) -> Any:
    return pytest.param(algo, option, bad, fragment, id=f"{algo.__name__[:3].lower()}:{option}={bad!r}")


ROWS = [
    # the top level (algo is a group of its own, below)
    _row("seed", -1, "an integer in [0, 4294967295] (numpy's seed range)"),
    _row("total_env_steps", -1, "an integer >= 0 (0 = no training step"),
    _row("time_limit_min", NAN, "a number >= 0 (0 = no limit)"),
    _row("batch_size", 0, "an integer >= 1"),
    _row("replay_ratio", -1.0, "a finite number >= 0 (0 = no update)"),
    _row("learning_starts", 0, "an integer >= 1"),
    _row("device", "gpu", "auto or a torch device"),
    _row("threads", -1, "an integer >= 0 (0 = torch's default)"),
    _row("resume", "", "never, auto or a checkpoint file or folder"),
    _row("algo.grad_accum", 5, "does not divide batch_size=32"),  # SAC: equal micro-batches of the batch
    _row("buffer.capacity", 8, ">= env.num_envs=16"),  # SAC: every env keeps its rows
    # env
    _row("env.id", "", "a registered env id"),
    _row("env.num_envs", 0, "an integer >= 1"),
    _row("env.vector", "thread", "one of ['sync', 'subprocess']"),
    _row("env.corpus_episodes", -1, "an integer >= 0"),
    _row("env.preflight_episodes", -1, "an integer >= 0"),
    # model and model.lora
    _row("model.name", "", "a model: tiny"),
    _row("model.dtype", "int8", "one of ['auto', 'float32'"),
    _row("model.gradient_checkpointing", "yes", "true or false"),
    _row("model.attn_implementation", "flash", "one of ['sdpa', 'eager']"),
    _row("model.hidden", 0, "an integer >= 1"),
    _row("model.layers", 0, "an integer >= 1"),
    _row("model.heads", 0, "an integer >= 1"),
    _row("model.hidden", 63, "must be divisible by model.heads=2"),
    _row("model.intermediate", 0, "an integer >= 1"),
    _row("model.max_positions", 0, "an integer >= 1"),
    _row("model.init_seed", 2**64, "torch's seed range"),
    _row("model.tokenizer_cache", "", "a folder"),
    _row("model.lora.enabled", "no", "true or false"),
    _row("model.lora.r", 0, "an integer >= 1"),
    _row("model.lora.alpha", 0, "an integer >= 1"),
    _row("model.lora.dropout", 1.0, "in [0, 1)"),
    _row("model.lora.target_modules", [], "null or a non-empty list"),
    _row("model.lora.top_layers", -1, "an integer >= 0 (0 = every block)"),
    # agent
    _row("agent.n_q", 0, "an integer >= 1"),
    _row("agent.critic_hidden", [64, 0], "a list of items each an integer >= 1"),
    _row("agent.temperature", 0.0, "a finite number > 0"),
    _row("agent.length_norm", 1, "true or false"),
    _row("agent.separate_adapter", "no", "true or false"),
    # buffer and buffer.her
    _row("buffer.capacity", 0, "an integer >= 1"),
    _row("buffer.n_step", 0, "an integer >= 1"),
    _row("buffer.gamma", 1.5, "in [0, 1]"),
    _row("buffer.device", "cuda:x", "auto or a torch device"),
    _row("buffer.max_obs_tokens", 0, "an integer >= 1"),
    _row("buffer.max_goal_tokens", 0, "an integer >= 1"),
    _row("buffer.max_cands", 0, "an integer >= 1"),
    _row("buffer.max_cand_tokens", 0, "an integer >= 1"),
    _row("buffer.max_goals", 0, "an integer >= 1"),
    _row("buffer.max_achieved", 0, "an integer >= 1"),
    _row("buffer.token_dtype", "int8", "one of ['int16', 'int32', 'int64']"),
    _row("buffer.compile", "yes", "true or false"),
    _row("buffer.native", "yes", "one of ['auto', 'on', 'off']"),
    _row("buffer.her.strategy", "last", "one of ['future', 'final', 'episode']"),
    _row("buffer.her.ratio", 1.5, "in [0, 1] (0 disables HER)"),
    _row("buffer.her.rarity_draws", 0, "an integer >= 1 (1 = plain HER)"),
    _row("buffer.her.rare_fraction", -0.1, "in [0, 1]"),
    # prompt
    _row("prompt.template", "", "a non-empty string"),
    _row("prompt.template", "Observation: {obs} Goal: {goal}", "holding {goal} then {obs}, each exactly once"),
    _row("prompt.obs_truncation", "middle", "one of ['left', 'right', 'error']"),
    _row("prompt.chat", "no", "true or false"),
    _row("prompt.list_actions", "no", "true or false"),
    # logger
    _row("logger.wandb_mode", "offlin", "one of ['offline', 'online', 'disabled']"),
    _row("logger.project", "", "a non-empty string"),
    _row("logger.jsonl", "no", "true or false"),
    _row("logger.progress", "no", "true or false"),
    _row("logger.log_every", -1, "an integer >= 0"),
    _row("logger.episodes", "no", "true or false"),
    _row("logger.episodes_max_mb", 0.0, "a finite number > 0"),
    # checkpoint
    _row("checkpoint.every", -1, "an integer >= 0 (0 disables checkpoints)"),
    _row("checkpoint.keep", -2, "an integer >= 0 (0 keeps all)"),
    _row("checkpoint.lean", "no", "true or false"),
    _row("checkpoint.on_error", "pause", "one of ['stop', 'continue']"),
    # eval
    _row("eval.every", -1, "an integer >= 0 (0 = only at the end)"),
    _row("eval.episodes_per_category", 0, "an integer >= 1"),
    _row("eval.num_envs", 0, "an integer >= 1"),
    _row("eval.sample", "no", "true or false"),
    _row("eval.seed", -1, "an integer >= 0"),
    # relabel and relabel.llm
    _row("relabel.source", "human", "one of ['oracle', 'rule', 'llm']"),
    _row("relabel.llm.model", "", "a model"),
    _row("relabel.llm.judge", "human", "one of ['model', 'rule']"),
    _row("relabel.llm.judge_model", "", "null or a model"),
    _row("relabel.llm.threshold", 1.5, "in [0, 1]"),
    _row("relabel.llm.max_goals", 0, "an integer >= 1"),
    _row("relabel.llm.chat", "no", "true or false"),
    _row("relabel.llm.batch_size", 0, "an integer >= 1"),
    _row("relabel.llm.background", "no", "true or false"),
    _row("relabel.llm.max_pending", -1, "an integer >= 0 (0 = no limit)"),
    _row("relabel.llm.device", "auto", "a torch device"),
    _row("relabel.llm.dtype", "int8", "one of ['auto', 'float32'"),
    # curriculum
    _row("curriculum.kind", "lp", "one of ['uniform', 'alp']"),
    _row("curriculum.window", 0, "an integer >= 1"),
    _row("curriculum.eps_start", 1.5, "in [0, 1]"),
    _row("curriculum.eps_end", -0.5, "in [0, 1]"),
    _row("curriculum.anneal_episodes", -1, "an integer >= 0"),
    # algo=sac
    _row("algo.name", "ppo", "one of ['sac']"),
    _row("algo.lr_actor", 0.0, "a finite number > 0"),
    _row("algo.lr_critic", -1e-3, "a finite number > 0"),
    _row("algo.lr_alpha", NAN, "a finite number > 0"),
    _row("algo.alpha_mode", "learned", "one of ['auto', 'fixed']"),
    _row("algo.alpha_init", 0.0, "a finite number > 0"),
    _row("algo.alpha_min", -1.0, "a finite number >= 0 (0 = no floor)"),
    _row("algo.target_entropy_ratio", 1.5, "in [0, 1]"),
    _row("algo.tau", 1.5, "in [0, 1]"),
    _row("algo.critic_warmup_updates", -1, "an integer >= 0"),
    _row("algo.grad_clip", -1.0, "a number >= 0 (0 = no clipping)"),
    _row("algo.grad_accum", 0, "an integer >= 1"),
    _row("algo.huber", "no", "true or false"),
    _row("algo.hindsight_bc_coef", -1.0, "a finite number >= 0"),
    _row("algo.hindsight_bc_within_limit", "no", "true or false"),
    _row("algo.hindsight_bc_discount", 2.0, "in [0, 1] (0 = off)"),
    # algo=ppo
    _row("algo.name", "sac", "one of ['ppo']", PPOConfig),
    _row("algo.lr", 0.0, "a finite number > 0", PPOConfig),
    _row("algo.adam_eps", 0.0, "a finite number > 0", PPOConfig),
    _row("algo.gamma", 1.5, "in [0, 1]", PPOConfig),
    _row("algo.gae_lambda", -0.1, "in [0, 1]", PPOConfig),
    _row("algo.rollout_steps", 0, "an integer >= 1", PPOConfig),
    _row("algo.epochs", 0, "an integer >= 1", PPOConfig),
    _row("algo.minibatch_size", 0, "an integer >= 1", PPOConfig),
    _row("algo.grad_accum", 0, "an integer >= 1", PPOConfig),
    _row("algo.grad_accum", 3, "does not divide algo.minibatch_size=64", PPOConfig),
    _row("algo.clip_coef", 0.0, "a finite number > 0", PPOConfig),
    _row("algo.clip_value", -0.2, "a finite number >= 0 (0 = unclipped)", PPOConfig),
    _row("algo.ent_coef", -0.01, "a finite number >= 0", PPOConfig),
    _row("algo.vf_coef", -0.5, "a finite number >= 0", PPOConfig),
    _row("algo.max_grad_norm", NAN, "a number >= 0 (0 = no clipping)", PPOConfig),
    _row("algo.norm_adv", "no", "true or false", PPOConfig),
    _row("algo.reward_scale", 0.0, "a finite number > 0", PPOConfig),
    _row("algo.target_kl", -1.0, "a number >= 0 (0 = off)", PPOConfig),
    _row("algo.value_hidden", [0], "a list of items each an integer >= 1", PPOConfig),
    _row("algo.value_activation", "gelu", "one of ['sigmoid', 'relu', 'tanh']", PPOConfig),
    # algo=eto
    _row("algo.name", "sac", "one of ['eto']", ETOConfig),
    _row("algo.tasks", 0, "an integer >= 1", ETOConfig),
    _row("algo.warm_start_episodes", -1, "an integer >= 0", ETOConfig),
    _row("algo.sft_epochs", -1, "an integer >= 0", ETOConfig),
    _row("algo.sft_epochs", 0, ">= 1 when algo.warm_start_episodes=256 > 0", ETOConfig),
    _row("algo.sft_lr", 0.0, "a finite number > 0", ETOConfig),
    _row("algo.sft_batch_size", 0, "an integer >= 1", ETOConfig),
    _row("algo.rounds", 1.5, "an integer >= 0", ETOConfig),
    _row("algo.betas", [], "a non-empty list of items each a finite number > 0", ETOConfig),
    _row("algo.lrs", [1e-6, 0.0], "a non-empty list of items each a finite number > 0", ETOConfig),
    _row("algo.epochs", 0, "an integer >= 1", ETOConfig),
    _row("algo.explore", "beam", "one of ['greedy', 'sample']", ETOConfig),
    _row("algo.pair_with", "worst", "one of ['expert', 'best']", ETOConfig),
    _row("algo.margin", -1, "an integer >= 0", ETOConfig),
    _row("algo.sft_coef", -0.1, "a finite number >= 0", ETOConfig),
    _row("algo.batch_size", 0, "an integer >= 1", ETOConfig),
    _row("algo.max_grad_norm", -1.0, "a number >= 0", ETOConfig),
    _row("algo.max_steps_per_batch", 0, "an integer >= 1", ETOConfig),
    _row("algo.pairs_file", "", "null or a non-empty path", ETOConfig),
]


def _nested(cls: type, parts: list[str], value: Any) -> Any:
    """``cls`` with the option at ``parts`` (a dotted path split) set to ``value``, every other option its default."""
    if len(parts) == 1:
        return cls(**{parts[0]: value})
    sub = type(getattr(cls(), parts[0]))
    return cls(**{parts[0]: _nested(sub, parts[1:], value)})


def build(algo: type, option: str, value: Any) -> TrainConfig:
    """The typed config with ``option`` (its command-line key) set to ``value``, built as Hydra builds it: the
    innermost dataclass first, ``TrainConfig`` last."""
    head, *rest = option.split(".")
    if head == "algo":
        return TrainConfig(algo=_nested(algo, rest, value))
    if not rest:
        return TrainConfig(algo=algo(), **{head: value})
    sub = type(getattr(TrainConfig(algo=algo()), head))
    return TrainConfig(algo=algo(), **{head: _nested(sub, rest, value)})


@pytest.mark.parametrize(("algo", "option", "bad", "fragment"), ROWS)
def test_a_bad_value_is_refused_naming_the_option_its_value_and_the_domain(
    algo: type, option: str, bad: Any, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(algo, option, bad)
    message = str(info.value)
    assert message.startswith(f"{option}={bad!r} "), message
    assert fragment in message, message


def test_the_message_is_exact_and_an_error_is_still_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^buffer\.her\.ratio=1\.5 is out of range: HERConfig\.ratio must be in "
                                         r"\[0, 1\] \(0 disables HER\)$"):
        BufferConfig(her=HERConfig(ratio=1.5))
    with pytest.raises(ConfigError, match=r"^buffer\.native='yes' is not allowed: BufferConfig\.native must be one "
                                          r"of \['auto', 'on', 'off'\]$"):
        BufferConfig(native="yes")


def test_every_field_declares_its_domain_and_every_checked_option_has_a_row() -> None:
    declared: set[tuple[str, str]] = set()
    for cls, path, table in SECTIONS:
        default = cls(algo=SACConfig()) if cls is TrainConfig else cls()
        own = {f.name for f in fields(cls) if not is_dataclass(getattr(default, f.name))}
        assert own == set(table), (cls.__name__, own ^ set(table))
        declared |= {(cls.__name__ if path == "algo" else "", f"{path}.{n}" if path else n)
                     for n, d in table.items() if not isinstance(d, Free)}
    rows = {(p.values[0].__name__ if p.values[1].startswith("algo.") else "", p.values[1]) for p in ROWS}
    assert declared - rows == set(), "validated options without a bad-value row"
    assert rows - declared == set(), "rows for options no table declares"


def test_every_default_is_valid() -> None:
    for cls, _, table in SECTIONS:
        default = cls(algo=SACConfig()) if cls is TrainConfig else cls()
        for name, domain in table.items():
            assert domain.accepts(getattr(default, name)), (cls.__name__, name)


# ------------------------------------------------------------------------------------------- the domain types


def test_range_bounds_types_and_descriptions() -> None:
    unit, count = Range(low=0, high=1), Range(low=1, integer=True)
    assert [unit.accepts(v) for v in (0, 0.5, 1, 1.0001, -0.0, NAN, True, "0.5")] == [
        True, True, True, False, True, False, False, False]
    assert [count.accepts(v) for v in (1, 10**30, np.int64(3), 0, 2.0, True)] == [
        True, True, True, False, False, False]
    assert not Range(low=0).accepts(math.inf) and Range(low=0, finite=False).accepts(math.inf)
    assert not Range(low=0, finite=False).accepts(NAN)
    assert not Range(low=0, low_open=True).accepts(0.0) and Range(low=0, low_open=True).accepts(1e-12)
    assert [r.describe() for r in (unit, count, Range(low=0, low_open=True), Range(low=0, high=1, high_open=True),
                                   Range(low=0, finite=False, note="0 = off"), Range(high=2.5))] == [
        "in [0, 1]", "an integer >= 1", "a finite number > 0", "in [0, 1)", "a number >= 0 (0 = off)",
        "a finite number <= 2.5"]


def test_device_each_and_maybe() -> None:
    device, no_auto = Device(), Device(auto=False)
    assert [device.accepts(v) for v in ("auto", "cpu", "cuda", "cuda:1", "mps", "cuda:", "cuda:x", "gpu", "", 0)] == [
        True, True, True, True, True, False, False, False, False, False]
    assert not no_auto.accepts("auto") and no_auto.accepts("cuda:0")
    each = Each(Range(low=1, integer=True), nonempty=True)
    assert [each.accepts(v) for v in ([1, 2], (3,), [], [1, 0], "12", None)] == [True, True, False, False, False,
                                                                                  False]
    assert Maybe(each).accepts(None) and not Maybe(each).accepts([])


def test_check_divides_names_both_options() -> None:
    check_divides(("algo.grad_accum", 4), ("batch_size", 32), "why")
    with pytest.raises(ConfigError, match=r"^algo\.grad_accum=3 does not divide batch_size=32: equal parts$"):
        check_divides(("algo.grad_accum", 3), ("batch_size", 32), "equal parts")


# ------------------------------------------------------------------------------------ rules between options


def test_rules_between_options() -> None:
    PromptConfig(actions_format="no field")  # not read without list_actions
    with pytest.raises(ConfigError, match=r"^prompt\.actions_format='Actions:' is not allowed: .*\{actions\} "
                                          r"exactly once"):
        PromptConfig(list_actions=True, actions_format="Actions:")
    ETOConfig(warm_start_episodes=0, sft_epochs=0)  # no behaviour cloning: no epochs needed
    ModelConfig(name="smollm2-135m", heads=3)  # the tiny model's shape options are not read for another model
    with pytest.raises(ConfigError, match=r"^model\.hidden=64 must be divisible by model\.heads=3: "):
        ModelConfig(heads=3)
    ModelConfig(layers=2, lora=LoraConfig(enabled=False, top_layers=3))  # no adapters: top_layers is not read
    ModelConfig(layers=2, lora=LoraConfig(enabled=True, top_layers=2))
    with pytest.raises(ConfigError, match=r"^model\.lora\.top_layers=3 is out of range: LoraConfig\.top_layers must "
                                          r"be <= model\.layers=2 "):
        ModelConfig(layers=2, lora=LoraConfig(enabled=True, top_layers=3))
    TrainConfig(algo=PPOConfig(), batch_size=7, buffer=BufferConfig(capacity=1))  # PPO reads neither
    TrainConfig(algo=SACConfig(grad_accum=4), batch_size=32)
    with pytest.raises(ConfigError, match=r"^algo\.grad_accum=4 does not divide batch_size=30"):
        TrainConfig(algo=SACConfig(grad_accum=4), batch_size=30)


def test_shares_of_a_data_parallel_run_divide_evenly() -> None:
    """Each of the processes samples ``batch_size / world`` transitions per update in ``algo.grad_accum`` equal
    micro-batches: 12 / 2 = 6 does not split into 4 (the typed config alone, 12 / 4, cannot see it)."""
    from sacglam.distributed import Dist, check_data_parallel

    check_data_parallel(TrainConfig(algo=SACConfig(grad_accum=4), batch_size=24), Dist(rank=0, world=3))
    with pytest.raises(ConfigError, match=r"^batch_size=12 must divide by the 2 processes x algo\.grad_accum=4 "):
        check_data_parallel(TrainConfig(algo=SACConfig(grad_accum=4), batch_size=12), Dist(rank=0, world=2))
    with pytest.raises(ConfigError, match=r"^algo\.minibatch_size=64 must divide by the 3 processes x "):
        check_data_parallel(TrainConfig(algo=PPOConfig()), Dist(rank=0, world=3))


# ---------------------------------------------------------------------------------------- through Hydra


def _compose(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        dcfg = compose("config", overrides=overrides)
    if OmegaConf.is_missing(dcfg.env.kwargs, "game"):  # env=textworld: a game the user makes and names
        dcfg.env.kwargs.game = "games/quick.z8"
    return OmegaConf.to_object(dcfg)


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[f"{group}={name}"] for group in ("experiment", "algo", "env")
                                       for name in _presets(group)], ids=lambda o: o[0])
def test_every_preset_composes_into_a_valid_typed_config(overrides: list[str]) -> None:
    cfg = _compose(overrides)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.algo, SACConfig | PPOConfig | ETOConfig)


@pytest.mark.parametrize(("overrides", "message"), [
    (["buffer.her.ratio=1.5"], "buffer.her.ratio=1.5 is out of range"),
    (["model.lora.r=0"], "model.lora.r=0 is out of range"),
    (["relabel.llm.threshold=2"], "relabel.llm.threshold=2.0 is out of range"),
    (["algo=ppo", "algo.grad_accum=3"], "algo.grad_accum=3 does not divide algo.minibatch_size=64"),
    (["algo=eto", "algo.lrs=[1e-6,-1]"], "algo.lrs=[1e-06, -1.0] is not allowed"),
    (["time_limit_min=nan"], "time_limit_min=nan is out of range"),
])
def test_hydra_overrides_are_refused_under_their_command_line_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _compose(overrides)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.integration
def test_train_py_refuses_a_bad_value_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "algo.tau=1.5", "threads=1", "total_env_steps=0",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "algo.tau=1.5 is out of range: SACConfig.tau must be in [0, 1]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
