"""Train an LLM agent in a text environment: discrete soft actor-critic with hindsight relabelling, or PPO-GLAM.

    python train.py                                   # Playground-Text, tiny model, SAC + HER (the default)
    python train.py algo=ppo                          # the same with PPO-GLAM (on-policy rollouts)
    python train.py experiment=bitflip_her seed=3     # any preset in conf/experiment, any field as key=value
    python train.py resume=auto hydra.run.dir=outputs/run1

The loop: collect one vector step -> the algorithm observes it (SAC: replay buffer + sampled updates; PPO: rollout
storage + an update per full rollout) -> log / evaluate / checkpoint. Envs, model, codec, evaluation, logging and
checkpoints are shared by both algorithms.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium
import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from envs.vector import make_vector_env
from sacglam.agent import Agent
from sacglam.buffer import ReplayBuffer
from sacglam.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from sacglam.collector import Collector, episode_metrics
from sacglam.config import ALGOS, TrainConfig, register_configs
from sacglam.episode_log import EpisodeLog
from sacglam.episodes import EpisodeTracker
from sacglam.evaluate import evaluate_splits
from sacglam.logging import RunLogger
from sacglam.models import is_seq2seq, load_model
from sacglam.pipeline import StepEncoder, check_context, make_act_fn, tokenizer_corpus
from sacglam.ppo import PPOAgent, PPOConfig, PPOLearner, check_on_policy
from sacglam.prompting import PromptCodec
from sacglam.relabel import GoalSpace, OnlineRelabeller, RelabelStats, make_source
from sacglam.sac import NonFiniteLossError, SACConfig, SACLearner

register_configs()


def make_env_fn(cfg: TrainConfig, **overrides: Any) -> Callable[[], Any]:
    """A factory of one env of ``cfg.env.id`` with its kwargs (plus ``overrides``); unknown ids name the known ones."""
    if cfg.env.id not in gymnasium.registry:
        known = sorted(k for k in gymnasium.registry if k.startswith("sacglam/"))
        raise ValueError(f"unknown env id {cfg.env.id!r}; registered text envs: {known}")
    kwargs = {**cfg.env.kwargs, **overrides}
    return lambda: gymnasium.make(cfg.env.id, **kwargs).unwrapped


def make_codec(cfg: TrainConfig, tokenizer: Any, seq2seq: bool = False) -> PromptCodec:
    """The prompt codec, faithful to the model's tokenizer (``PromptCodec.from_tokenizer``); the buffer's limits."""
    b, p = cfg.buffer, cfg.prompt
    return PromptCodec.from_tokenizer(
        tokenizer, template=p.template, seq2seq=seq2seq, chat=p.chat, system=p.system, list_actions=p.list_actions,
        actions_format=p.actions_format, action_sep=p.action_sep, max_goal_tokens=b.max_goal_tokens,
        max_obs_tokens=b.max_obs_tokens, max_cands=b.max_cands, max_cand_tokens=b.max_cand_tokens,
        obs_truncation=p.obs_truncation,
    )


def env_state(vec: Any) -> Any:
    """The vector env's exact state, or None for envs that cannot be saved mid-episode (they restart on resume)."""
    try:
        return vec.get_state()
    except TypeError as exc:
        warnings.warn(f"{exc}; resume will not be exact", stacklevel=2)
        return None


def build_model(cfg: TrainConfig, probe: Any, device: torch.device) -> tuple[Any, Any, PromptCodec]:
    """The run's model, tokenizer and prompt codec. The tokenizer corpus is drawn from ``probe`` (an env of
    ``make_env_fn(cfg)``) with a seed derived from ``cfg.seed``, so rebuilding a run's model gives the vocabulary its
    checkpoint needs."""
    corpus = tokenizer_corpus(cfg.prompt.template, probe, cfg.env.corpus_episodes, seed=cfg.seed + 12345)
    model, tokenizer = load_model(cfg.model, corpus=corpus, device=device)
    return model, tokenizer, model_codec(cfg, model, tokenizer)


def model_codec(cfg: TrainConfig, model: Any, tokenizer: Any) -> PromptCodec:
    """``make_codec`` for ``model`` (seq2seq or not), checked against its context length."""
    codec = make_codec(cfg, tokenizer, seq2seq=is_seq2seq(model))
    check_context(codec, getattr(getattr(model, "config", None), "max_position_embeddings", None))
    return codec


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device``: ``auto`` is cuda when available, else cpu."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)


def make_agent(cfg: TrainConfig, model: Any, device: torch.device) -> Agent | PPOAgent:
    """The algorithm's agent around ``model``: SAC's actor + critics, or PPO's policy + value head."""
    if isinstance(cfg.algo, PPOConfig):
        ppo = PPOAgent(model, cfg.algo, temperature=cfg.agent.temperature, length_norm=cfg.agent.length_norm)
        return ppo.to(device)
    return Agent(model, cfg.agent).to(device)


def eval_env_fns(cfg: TrainConfig) -> dict[str, Callable[[], Any]]:
    """Evaluation env factories by metric prefix: ``""`` (``env.kwargs`` + ``env.eval_kwargs``) and, where
    ``env.heldout_kwargs`` is set, ``"heldout/"`` (held-out objects)."""
    fns = {"": make_env_fn(cfg, **cfg.env.eval_kwargs)}
    if cfg.env.heldout_kwargs:
        fns["heldout/"] = make_env_fn(cfg, **{**cfg.env.eval_kwargs, **cfg.env.heldout_kwargs})
    return fns


def make_learner(cfg: TrainConfig, model: Any, codec: PromptCodec, probe: Any,
                 device: torch.device) -> tuple[Any, SACLearner | PPOLearner]:
    """The agent and the part of the loop that differs per algorithm: ``learner.act`` acts for the collector and
    ``learner.observe(step)`` stores the step and updates when it is time."""
    act_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    agent = make_agent(cfg, model, device)
    if isinstance(agent, PPOAgent) and isinstance(cfg.algo, PPOConfig):
        check_on_policy(list(HydraConfig.get().overrides.task), cfg.buffer.her.ratio, cfg.buffer.her.rare_fraction)
        if cfg.relabel.source != "oracle":
            raise ValueError(f"relabel.source={cfg.relabel.source} feeds hindsight relabelling, which algo=ppo "
                             "does not do; use algo=sac (or leave relabel.source=oracle)")
        shuffle_gen = torch.Generator().manual_seed(cfg.seed + 2)
        return agent, PPOLearner(agent, cfg.algo, codec, cfg.env.num_envs, device, act_gen, shuffle_gen)
    assert isinstance(agent, Agent) and isinstance(cfg.algo, SACConfig)
    buffer_device = device if cfg.buffer.device == "auto" else cfg.buffer.device  # e.g. keep the buffer on the CPU
    buffer = ReplayBuffer(cfg.buffer, cfg.env.num_envs, pad_id=codec.pad_id, device=buffer_device, prompt=codec)
    relabeller = make_relabeller(cfg, probe)
    encoder = StepEncoder(codec, buffer, probe.goal_step_limit, cfg.buffer.max_achieved, relabeller is None)
    sample_gen = torch.Generator(buffer.device).manual_seed(cfg.seed + 2)
    return agent, SACLearner(agent, cfg.algo, buffer, encoder, codec, batch_size=cfg.batch_size,
                             replay_ratio=cfg.replay_ratio, learning_starts=cfg.learning_starts, device=device,
                             act_generator=act_gen, sample_generator=sample_gen, relabeller=relabeller)


def make_relabeller(cfg: TrainConfig, probe: Any) -> OnlineRelabeller | None:
    """The achieved-goal source of ``relabel.source`` run as episodes end (None for ``oracle``: the env's goals are
    stored as they come)."""
    if cfg.relabel.source == "oracle":
        return None
    source = make_source(cfg.relabel, probe, cfg.env.rules)
    background = cfg.relabel.source == "llm" and cfg.relabel.llm.background
    return OnlineRelabeller(source, RelabelStats(GoalSpace.from_env(probe)), background=background,
                            max_pending=cfg.relabel.llm.max_pending)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    if not isinstance(cfg.algo, (SACConfig, PPOConfig)):
        raise ValueError(f"algo must be one of the conf/algo presets ({', '.join(ALGOS)}); got {cfg.algo!r}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    # Environments, model, agent and the algorithm's own part of the loop.
    env_fn = make_env_fn(cfg)
    probe = env_fn()
    vec = make_vector_env(cfg.env.id, cfg.env.num_envs, env_kwargs=dict(cfg.env.kwargs), mode=cfg.env.vector)
    model, _, codec = build_model(cfg, probe, device)
    agent, learner = make_learner(cfg, model, codec, probe, device)
    collector = Collector(vec, learner.act, seed=cfg.seed)
    tracker = EpisodeTracker(cfg.env.num_envs)  # finished episodes as text, for the relabeller and episode log
    act_greedy = make_act_fn(agent, codec, greedy=True, device=device)
    eval_gen = torch.Generator(device)  # reseeded at every evaluation, so sampled evaluations are reproducible
    act_eval_sample = make_act_fn(agent, codec, greedy=False, device=device, generator=eval_gen)

    # Resume: the newest complete checkpoint of the run folder (a corrupt one is skipped with a warning).
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    next_eval, next_ckpt = cfg.eval.every, cfg.checkpoint.every
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=device, weights_only=False)  # our own file
        if state.get("algo") != cfg.algo.name:
            raise ValueError(f"{ckpt_path} was written by algo={state.get('algo')}, this run is "
                             f"algo={cfg.algo.name}; resume with the same algo")
        agent.load_state_dict(state["agent"])
        learner.load_state_dict(state["learner"])
        if state["envs"] is not None:
            vec.set_state(state["envs"])
        collector.load_state_dict(state["collector"], envs_restored=state["envs"] is not None)
        if "episodes" in state:
            tracker.load_state_dict(state["episodes"])
        if state["envs"] is None:
            tracker.drop_running()
        restore_rng_state(state["rng"], generators=learner.generators)
        next_eval, next_ckpt = state["loop"]
        print(f"resumed from {ckpt_path} at env step {collector.env_steps}")
    logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(dcfg, resolve=True), cfg.total_env_steps,  # type: ignore[arg-type]
                       resume_from_step=collector.env_steps if ckpt_path is not None else None)
    episode_log = EpisodeLog(run_dir, cfg.logger.episodes_max_mb, collector.env_steps if ckpt_path else None
                             ) if cfg.logger.episodes else None

    def run_eval() -> dict[str, float]:
        agent.eval()
        metrics = evaluate_splits(eval_env_fns(cfg), act_greedy, act_eval_sample if cfg.eval.sample else None,
                                  eval_gen, categories=probe.goal_categories, num_envs=cfg.eval.num_envs,
                                  episodes_per_category=cfg.eval.episodes_per_category, seed=cfg.eval.seed)
        agent.train()
        return metrics

    def checkpoint() -> None:
        state = {"algo": cfg.algo.name, "agent": agent.state_dict(), "learner": learner.state_dict(),
                 "collector": collector.state_dict(), "envs": env_state(vec), "episodes": tracker.state_dict(),
                 "rng": capture_rng_state(generators=learner.generators), "loop": (next_eval, next_ckpt)}
        save_checkpoint(run_dir, collector.env_steps, state, keep=cfg.checkpoint.keep)

    start, warned = time.monotonic(), set()
    while collector.env_steps < cfg.total_env_steps:
        if cfg.time_limit_min and time.monotonic() - start > 60 * cfg.time_limit_min:
            print(f"time limit of {cfg.time_limit_min} min reached at env step {collector.env_steps}")
            break
        # Collect one step of every env; the algorithm stores it and updates when it is time.
        step, episodes = collector.step()
        records = tracker.add(step, episodes, policy_version=learner.updates, env_steps=collector.env_steps)
        if episode_log is not None and records:
            episode_log.write(records)
        metrics: dict[str, Any] = episode_metrics(episodes) if episodes else {}
        try:
            metrics.update(learner.observe(step, records))
        except NonFiniteLossError as exc:
            last = find_latest_checkpoint(run_dir)
            raise RuntimeError(f"stopped at env step {collector.env_steps}: {exc} Last good checkpoint: "
                               f"{last or 'none'} (continue with resume=auto).") from exc
        if codec.truncated_count and "cut" not in warned:
            warned.add("cut")
            warnings.warn(f"observations longer than buffer.max_obs_tokens={codec.max_obs_tokens} are being cut "
                          f"({cfg.prompt.obs_truncation}); counted in charts/obs_truncated", stacklevel=1)
        if codec.unfaithful_count and "unfaithful" not in warned:
            warned.add("unfaithful")
            warnings.warn("some prompt text merges across the template's cuts, so its ids differ from the tokenizer's "
                          "on the whole text (PromptCodec); counted in charts/unfaithful_tokenisation", stacklevel=1)
        metrics.update({"charts/updates": learner.updates, "charts/obs_truncated": codec.truncated_count,
                        "charts/unfaithful_tokenisation": codec.unfaithful_count})
        if records and isinstance(learner, SACLearner):
            metrics.update(learner.relabel_metrics())
        if cfg.eval.every and collector.env_steps >= next_eval:
            metrics.update(run_eval())
            next_eval += cfg.eval.every
        logger.log(collector.env_steps, metrics)
        if cfg.checkpoint.every and collector.env_steps >= next_ckpt:
            next_ckpt += cfg.checkpoint.every
            checkpoint()

    final = run_eval()
    checkpoint()  # (after a background relabeller's last episodes are in the buffer and counted)
    if isinstance(learner, SACLearner):
        final.update(learner.relabel_metrics())
    logger.log(collector.env_steps, final)
    logger.close()
    vec.close()
    if episode_log is not None:
        episode_log.close()
    success = final.get("eval/greedy/success", 0.0)
    print(f"final greedy success {success:.3f} after {collector.env_steps} env steps and {learner.updates} updates; "
          f"run folder {run_dir}")
    return success


if __name__ == "__main__":
    main()
