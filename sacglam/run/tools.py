"""What the run-reading scripts share: a run's config and agent back from its folder, evaluation splits, tables.

    run = load_run("outputs/2026-12-06/10-00-00")               # newest complete checkpoint of a run folder
    run = load_run("outputs/.../checkpoints/step_0000040000.pt", ["eval.episodes_per_category=64"])
    rows, metrics = evaluate_splits(run.cfg, run.agent, run.codec, sample=False)
    print(markdown_table(rows))

A run is rebuilt from the config it trained with (``RUN/.hydra/config.yaml``, validated against today's schema, so
fields added since take their defaults) plus hydra-style ``key=value`` overrides (``+key=value`` adds a key,
``~key`` removes one). The model and its tokenizer always come from the run's own config (a tiny model's vocabulary
is drawn from its training env, so evaluating on other env kwargs must not change it); ``model.*`` overrides (dtype,
attention) and everything else (env, eval, prompt limits, agent temperature) apply as given. Used by
``scripts/evaluate.py``, ``scripts/export_policy.py``, ``scripts/export_hindsight.py``, ``scripts/zero_shot.py``,
``scripts/shortcut_eval.py`` and ``scripts/relabel_precision.py``; the run itself is built by the same builders as
``train.py``'s (``sacglam.run.builders``).

Importing this module sets the offline defaults ``train.py`` sets (no model hub, offline wandb) and registers the
config schema with Hydra's config store (as importing ``train.py`` does), so that the ``conf/`` presets compose.
The env ids a config names are registered by the caller's ``import envs`` (sacglam never imports envs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sacglam.agent import Agent
from sacglam.algos.eto.dpo import ETOConfig
from sacglam.algos.ppo.learner import PPOAgent, PPOConfig
from sacglam.algos.sac.learner import SACConfig
from sacglam.checkpoint import (
    CHECKPOINT_DIRNAME,
    CheckpointError,
    checkpoint_dir,
    find_latest_checkpoint,
    list_checkpoints,
    load_agent_state,
    load_checkpoint,
)
from sacglam.config import ALGOS, TrainConfig, register_configs
from sacglam.evaluate import evaluate_splits as evaluate_env_splits
from sacglam.evaluate import wilson_interval
from sacglam.pipeline import make_act_fn
from sacglam.prompting import PromptCodec
from sacglam.run import builders

ROOT = Path(__file__).resolve().parents[2]  # the repository: conf/ and train.py (the package is installed editable)
register_configs()  # base_config and the <algo>_schema nodes that conf/ and saved run configs compose on

CONFIG_FILE = Path(".hydra") / "config.yaml"


class RunError(Exception):
    """A run folder or checkpoint that cannot be used; the message names the path and what to do."""


# ------------------------------------------------------------------------------------------------------ config


def compose_config(overrides: Sequence[str]) -> TrainConfig:
    """The config ``python train.py OVERRIDES`` would run with: ``conf/config.yaml`` composed with the overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        dcfg = compose("config", overrides=list(overrides))
    return _typed(dcfg)


def published_config(overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of ``experiment=paper_sacglam model=tiny`` plus ``overrides`` (Hydra syntax): the published SAC-GLAM
    settings the benchmarks (``scripts/bench.py``, ``scripts/bench_memory.py``) run with."""
    return compose_config(["experiment=paper_sacglam", "model=tiny", *overrides])


def config_from_file(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """A saved run config (a ``.hydra/config.yaml``) with hydra-style overrides, validated against the schema.

    The saved values are composed on top of ``base_config`` and the ``<algo>_schema`` of the algo they name, so a
    misspelt override is an error naming the key and fields added to the schema since the run take their defaults.

    Raises:
        RunError: the file is missing or holds no ``algo.name`` the project knows.
    """
    if not path.is_file():
        raise RunError(f"{path} does not exist: a train.py run keeps its config in RUN/{CONFIG_FILE}, an exported "
                       "policy in OUT/config.yaml")
    saved = yaml.safe_load(path.read_text()) or {}
    algo = (saved.get("algo") or {}).get("name")
    if algo not in ALGOS:
        raise RunError(f"{path}: algo.name={algo!r} is not one of {sorted(ALGOS)}")
    primary = {"defaults": ["base_config", {"algo": f"{algo}_schema"}, "_self_"], **saved}
    with tempfile.TemporaryDirectory(prefix="sacglam-run-config-") as folder:
        (Path(folder) / "run.yaml").write_text(yaml.safe_dump(primary, sort_keys=False))
        with initialize_config_dir(config_dir=folder, version_base=None):
            dcfg = compose("run", overrides=list(overrides))
    return _typed(dcfg)


def _typed(dcfg: Any) -> TrainConfig:
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    if not isinstance(cfg.algo, (SACConfig, PPOConfig, ETOConfig)):
        raise RunError(f"algo must be one of the conf/algo presets ({', '.join(ALGOS)}); got {cfg.algo!r}")
    return cfg


def exported_codec(out: str | os.PathLike[str], tokenizer: Any) -> PromptCodec:
    """The prompt codec of a policy exported by ``scripts/export_policy.py``: ``builders.make_codec`` with the
    training config saved in ``OUT/config.yaml`` and the exported tokenizer, so every prompt option is the run's."""
    policy = json.loads((Path(out) / "sacglam_policy.json").read_text())
    cfg = config_from_file(Path(out) / "config.yaml")
    return builders.make_codec(cfg, tokenizer, seq2seq=bool(policy["model"]["seq2seq"]))


def config_yaml(cfg: TrainConfig) -> str:
    """``cfg`` as the YAML train.py saves in ``.hydra/config.yaml``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ------------------------------------------------------------------------------------------------ model, agent


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[Any, Any, PromptCodec, Any]:
    """The run's model, tokenizer and prompt codec through ``builders.build_model``, and its probe env.

    Returns:
        (model, tokenizer, codec, probe): probe is an env of ``builders.make_env_fn(cfg)`` (the tokenizer corpus came
        from it).
    """
    probe = builders.make_env_fn(cfg)()
    model, tokenizer, codec = builders.build_model(cfg, probe, device)
    return model, tokenizer, codec, probe


@dataclass
class LoadedRun:
    """A trained run back from its folder.

    Attributes:
        cfg: the run's config with the caller's overrides; run_cfg: without them (what the checkpoint was trained
            with).
        run_dir: the run folder; checkpoint: the loaded checkpoint file; step: its env-step counter.
        agent: Agent (SAC) or PPOAgent with the checkpoint's weights, in eval mode; tokenizer, codec: as the run's
            (the codec with the overridden prompt options); device: where the agent lives.
    """

    cfg: TrainConfig
    run_cfg: TrainConfig
    run_dir: Path
    checkpoint: Path
    step: int
    agent: Agent | PPOAgent
    tokenizer: Any
    codec: PromptCodec
    device: torch.device


def locate(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The run folder and checkpoint of ``path``: a run folder (its newest complete checkpoint), its checkpoints
    folder, or a checkpoint file ``RUN/checkpoints/step_*.pt``.

    Raises:
        RunError: the path does not exist, is a checkpoint outside a run's checkpoints folder, or the run has no
            complete checkpoint (corrupt ones are named).
    """
    p = Path(path)
    if not p.exists():
        raise RunError(f"{p} does not exist; pass a train.py run folder or one of its checkpoints/step_*.pt files")
    if p.is_file():
        if p.parent.name != CHECKPOINT_DIRNAME:
            raise RunError(f"{p} is not in a run's {CHECKPOINT_DIRNAME}/ folder, so its run config "
                           f"(RUN/{CONFIG_FILE}) cannot be found; pass RUN/{CHECKPOINT_DIRNAME}/step_*.pt or RUN")
        return p.parent.parent, p
    run_dir = p.parent if p.name == CHECKPOINT_DIRNAME and not checkpoint_dir(p).is_dir() else p
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = find_latest_checkpoint(run_dir)
    if ckpt is None:
        files = list_checkpoints(run_dir)
        if not files:
            raise RunError(f"no checkpoint in {checkpoint_dir(run_dir)}: the run saved none (checkpoint.every=0 and "
                           "killed before its end?) or this is not a run folder")
        skipped = "; ".join(str(w.message) for w in caught if "Skipping checkpoint" in str(w.message))
        raise RunError(f"no complete checkpoint in {checkpoint_dir(run_dir)}: {skipped}")
    for w in caught:  # an older checkpoint was taken: say which newer ones were skipped and why
        print(f"warning: {w.message}", file=sys.stderr)
    return run_dir, ckpt


def _load_state(ckpt: Path, device: torch.device) -> dict[str, Any]:
    try:
        return load_checkpoint(ckpt, map_location=device)
    except CheckpointError as exc:
        if "weights_only" not in str(exc):
            raise
    # A state holding other Python objects (an env's own state): our own run's file, as train.py's resume loads it.
    return load_checkpoint(ckpt, map_location=device, weights_only=False)


def load_run(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> LoadedRun:
    """Rebuild a run (config, model, agent, codec) and load a checkpoint's agent weights.

    Args:
        path: a run folder, its checkpoints folder, or a checkpoint file (see :func:`locate`).
        overrides: hydra-style overrides of the saved config (``eval.episodes_per_category=64``, ``+env.kwargs.x=1``,
            ``device=cpu``).

    Raises:
        RunError, CheckpointError: a missing path, no complete checkpoint, a corrupt one, or one whose weights do not
            fit the rebuilt model (the messages name the path).
    """
    run_dir, ckpt = locate(path)
    config_file = run_dir / CONFIG_FILE
    run_cfg = config_from_file(config_file)
    cfg = config_from_file(config_file, overrides)
    device = builders.resolve_device(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # The model as trained (its vocabulary comes from the run's training env), with model.* overrides such as dtype.
    model, tokenizer, _, _ = build_model(dataclasses.replace(run_cfg, model=cfg.model), device)
    codec = builders.model_codec(cfg, model, tokenizer)
    agent = builders.make_agent(cfg, model, device)
    state = _load_state(ckpt, device)
    if state.get("algo") != cfg.algo.name:
        raise RunError(f"{ckpt} was written by algo={state.get('algo')} but {config_file} says "
                       f"algo={cfg.algo.name}")
    try:
        # A lean checkpoint (frozen base) holds the trainable weights only: they go over the base rebuilt above,
        # once its fingerprint matches the checkpoint's.
        load_agent_state(agent, state, ckpt, cfg.model.name)
    except ValueError as exc:
        raise RunError(f"{exc} (rebuilt from {config_file}; was model.* overridden?)") from exc
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:3]
        raise RunError(f"{ckpt}: the agent weights do not fit the model rebuilt from {config_file} "
                       f"({' '.join(s.strip() for s in first)[:300]}); was model.* or agent.* overridden?") from exc
    agent.eval()
    step = int(ckpt.stem.split("_")[-1]) if ckpt.stem.startswith("step_") else -1
    return LoadedRun(cfg, run_cfg, run_dir, ckpt, step, agent, tokenizer, codec, device)


# -------------------------------------------------------------------------------------------------- evaluation


@dataclass
class Row:
    """Success of one (split, goal category, mode): ``successes`` of ``episodes``, with the 95% Wilson interval."""

    split: str
    category: str
    mode: str
    episodes: int
    successes: int
    success: float
    low: float
    high: float


def evaluate_splits(
    cfg: TrainConfig, agent: Any, codec: PromptCodec, *, sample: bool, episodes: int | None = None,
) -> tuple[list[Row], dict[str, float]]:
    """Greedy (and sampled) success per split and goal category, exactly as train.py's ``run_eval``.

    Episode ``j`` of a split is reset with seed ``cfg.eval.seed + j``; the sampling generator is reseeded with
    ``cfg.eval.seed`` before each split, so the numbers equal the run's own evaluations at the same weights.

    Args:
        cfg: the run's config (env, eval.seed, eval.num_envs, eval.episodes_per_category).
        agent: anything with ``Agent.act``'s signature, in eval mode.
        codec: the prompt codec.
        sample: also evaluate the sampled policy.
        episodes: episodes per category and split (default ``cfg.eval.episodes_per_category``).

    Returns:
        (rows, metrics): table rows, and the metrics under train.py's names (``eval/greedy/success/<cat>``,
        ``eval/heldout/greedy/success/<cat>``, ...), comparable with a run's metrics.jsonl.
    """
    device = next(agent.parameters()).device
    n = cfg.eval.episodes_per_category if episodes is None else episodes
    categories = list(builders.make_env_fn(cfg)().goal_categories)
    act_greedy = make_act_fn(agent, codec, greedy=True, device=device)
    gen = torch.Generator(device)
    act_sample = make_act_fn(agent, codec, greedy=False, device=device, generator=gen) if sample else None
    env_fns = builders.eval_env_fns(cfg)
    metrics = evaluate_env_splits(env_fns, act_greedy, act_sample, gen, categories=categories,
                                  num_envs=cfg.eval.num_envs, episodes_per_category=n, seed=cfg.eval.seed)
    rows: list[Row] = []
    for prefix in env_fns:
        for mode in ("greedy", "sample") if sample else ("greedy",):
            for c in categories:
                k = round(metrics[f"eval/{prefix}{mode}/success/{c}"] * n)
                low, high = wilson_interval(k, n)
                rows.append(Row(prefix.rstrip("/") or "train", c, mode, n, k, k / n, low, high))
    return rows, metrics


def markdown_table(rows: Sequence[Row], variants: Sequence[str] | None = None) -> str:
    """Rows as a markdown table; ``variants`` (one name per row) adds a first column."""
    head = ["split", "goal category", "mode", "episodes", "successes", "success", "95% CI (Wilson)"]
    align = ["---", "---", "---", "---:", "---:", "---:", "---"]
    if variants is not None:
        head, align = ["variant", *head], ["---", *align]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for i, r in enumerate(rows):
        cells = [r.split, r.category, r.mode, str(r.episodes), str(r.successes), f"{r.success:.3f}",
                 f"[{r.low:.3f}, {r.high:.3f}]"]
        if variants is not None:
            cells = [variants[i], *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ errors

EXPECTED_ERRORS = (RunError, CheckpointError, FileNotFoundError, ModuleNotFoundError, ValueError, HydraException,
                   OmegaConfBaseException)


def one_line(exc: BaseException) -> str:
    """An error and its causes as one line (Hydra's messages span several)."""
    parts: list[str] = []
    e: BaseException | None = exc
    while e is not None and len(parts) < 3:
        text = " ".join(str(e).split())
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__
    return f"{type(exc).__name__}: {' <- '.join(parts)}"


def run_main(main: Callable[[], int], prog: str) -> int:
    """Run a script's ``main``; an expected error (bad path, corrupt checkpoint, bad override) becomes one line on
    stderr and exit status 2, instead of a traceback."""
    try:
        return main()
    except EXPECTED_ERRORS as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
