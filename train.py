"""Train an LLM agent in a text environment with discrete soft actor-critic and hindsight relabelling.

    python train.py                                   # Playground-Text, tiny model, SAC + HER (the default)
    python train.py experiment=bitflip_her seed=3     # any preset in conf/experiment, any field as key=value
    python train.py resume=auto hydra.run.dir=outputs/run1

The loop: collect one vector step -> add it to the replay buffer -> sample and update -> log / evaluate / checkpoint.
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
from sacglam.config import TrainConfig, register_configs
from sacglam.evaluate import evaluate
from sacglam.logging import RunLogger
from sacglam.models import load_model
from sacglam.pipeline import StepEncoder, check_context, make_act_fn, tokenizer_corpus
from sacglam.prompting import PromptCodec, PromptTemplate
from sacglam.sac import NonFiniteLossError, SACUpdater

register_configs()


def make_env_fn(cfg: TrainConfig, **overrides: Any) -> Callable[[], Any]:
    """A factory of one env of ``cfg.env.id`` with its kwargs (plus ``overrides``); unknown ids name the known ones."""
    if cfg.env.id not in gymnasium.registry:
        known = sorted(k for k in gymnasium.registry if k.startswith("sacglam/"))
        raise ValueError(f"unknown env id {cfg.env.id!r}; registered text envs: {known}")
    kwargs = {**cfg.env.kwargs, **overrides}
    return lambda: gymnasium.make(cfg.env.id, **kwargs).unwrapped


def make_codec(cfg: TrainConfig, tokenizer: Any) -> PromptCodec:
    """The prompt codec: the tokenizer's ``encode`` without special tokens; limits are the buffer's."""
    b = cfg.buffer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PromptCodec(
        lambda text: tokenizer.encode(text, add_special_tokens=False),
        pad_id=pad_id,
        template=PromptTemplate.from_format(cfg.prompt.template),
        max_goal_tokens=b.max_goal_tokens,
        max_obs_tokens=b.max_obs_tokens,
        max_cands=b.max_cands,
        max_cand_tokens=b.max_cand_tokens,
        bos_id=tokenizer.bos_token_id,
        obs_truncation=cfg.prompt.obs_truncation,  # type: ignore[arg-type]
    )


def env_state(vec: Any) -> Any:
    """The vector env's exact state, or None for envs that cannot be saved mid-episode (they restart on resume)."""
    try:
        return vec.get_state()
    except TypeError as exc:
        warnings.warn(f"{exc}; resume will not be exact", stacklevel=2)
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    # Environments, model, agent, buffer.
    env_fn = make_env_fn(cfg)
    probe = env_fn()
    vec = make_vector_env(cfg.env.id, cfg.env.num_envs, env_kwargs=dict(cfg.env.kwargs), mode=cfg.env.vector)
    corpus = tokenizer_corpus(cfg.prompt.template, probe, cfg.env.corpus_episodes, seed=cfg.seed + 12345)
    model, tokenizer = load_model(cfg.model, corpus=corpus, device=device)
    codec = make_codec(cfg, tokenizer)
    check_context(codec, getattr(getattr(model, "config", None), "max_position_embeddings", None))
    agent = Agent(model, cfg.agent).to(device)
    updater = SACUpdater(agent, cfg.algo)
    buffer_device = device if cfg.buffer.device == "auto" else cfg.buffer.device  # e.g. keep the buffer on the CPU
    buffer = ReplayBuffer(cfg.buffer, cfg.env.num_envs, pad_id=codec.pad_id, device=buffer_device, prompt=codec)
    encoder = StepEncoder(codec, buffer, probe.goal_step_limit, cfg.buffer.max_achieved)
    act_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    sample_gen = torch.Generator(buffer.device).manual_seed(cfg.seed + 2)
    act_sample = make_act_fn(agent, codec, greedy=False, device=device, generator=act_gen)
    collector = Collector(vec, act_sample, seed=cfg.seed)
    act_greedy = make_act_fn(agent, codec, greedy=True, device=device)
    eval_gen = torch.Generator(device)  # reseeded at every evaluation, so sampled evaluations are reproducible
    act_eval_sample = make_act_fn(agent, codec, greedy=False, device=device, generator=eval_gen)
    eval_fns = {"": make_env_fn(cfg, **cfg.env.eval_kwargs)}
    if cfg.env.heldout_kwargs:
        eval_fns["heldout/"] = make_env_fn(cfg, **{**cfg.env.eval_kwargs, **cfg.env.heldout_kwargs})

    # Resume: the newest complete checkpoint of the run folder (a corrupt one is skipped with a warning).
    ckpt_path = resolve_resume(cfg.resume, run_dir)
    updates, update_credit, next_eval, next_ckpt = 0, 0.0, cfg.eval.every, cfg.checkpoint.every
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=device, weights_only=False)  # our own file
        agent.load_state_dict(state["agent"])
        updater.load_state_dict(state["updater"])
        buffer.load_state_dict(state["buffer"])
        encoder.load_state_dict(state["encoder"])
        if state["envs"] is not None:
            vec.set_state(state["envs"])
        collector.load_state_dict(state["collector"], envs_restored=state["envs"] is not None)
        restore_rng_state(state["rng"], generators={"act": act_gen, "sample": sample_gen})
        updates, update_credit, next_eval, next_ckpt = state["loop"]
        print(f"resumed from {ckpt_path} at env step {collector.env_steps}")
    logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(dcfg, resolve=True), cfg.total_env_steps,  # type: ignore[arg-type]
                       resume_from_step=collector.env_steps if ckpt_path is not None else None)

    def run_eval() -> dict[str, float]:
        agent.eval()
        metrics: dict[str, float] = {}
        for prefix, fn in eval_fns.items():
            eval_gen.manual_seed(cfg.eval.seed)
            result = evaluate([fn] * cfg.eval.num_envs, act_greedy, act_eval_sample if cfg.eval.sample else None,
                              categories=probe.goal_categories,
                              episodes_per_category=cfg.eval.episodes_per_category, seed=cfg.eval.seed)
            metrics.update({k.replace("eval/", f"eval/{prefix}", 1): v for k, v in result.items()})
        agent.train()
        return metrics

    def checkpoint() -> None:
        state = {"agent": agent.state_dict(), "updater": updater.state_dict(), "buffer": buffer.state_dict(),
                 "encoder": encoder.state_dict(), "collector": collector.state_dict(), "envs": env_state(vec),
                 "rng": capture_rng_state(generators={"act": act_gen, "sample": sample_gen}),
                 "loop": (updates, update_credit, next_eval, next_ckpt)}
        save_checkpoint(run_dir, collector.env_steps, state, keep=cfg.checkpoint.keep)

    start, metrics_truncated_warned = time.monotonic(), False
    updates_per_vector_step = cfg.replay_ratio * cfg.env.num_envs / cfg.batch_size
    batch = None  # the last sampled batch, overwritten by the next sample once its update is done
    while collector.env_steps < cfg.total_env_steps:
        if cfg.time_limit_min and time.monotonic() - start > 60 * cfg.time_limit_min:
            print(f"time limit of {cfg.time_limit_min} min reached at env step {collector.env_steps}")
            break
        # Collect one step of every env and store it.
        step, episodes = collector.step()
        buffer.add(encoder(step, policy_version=updates))
        metrics: dict[str, Any] = episode_metrics(episodes) if episodes else {}
        # Update: `replay_ratio` sampled transitions per env step, once the buffer holds enough finished episodes.
        if buffer.num_sampleable >= cfg.learning_starts:
            update_credit += updates_per_vector_step
            while update_credit >= 1.0:
                try:
                    batch = buffer.sample(cfg.batch_size, sample_gen, out=batch)
                    metrics.update(updater.update(batch.to(device)))
                except NonFiniteLossError as exc:
                    last = find_latest_checkpoint(run_dir)
                    raise RuntimeError(f"stopped at env step {collector.env_steps}: {exc} Last good checkpoint: "
                                       f"{last or 'none'} (continue with resume=auto).") from exc
                updates += 1
                update_credit -= 1.0
        if codec.truncated_count and not metrics_truncated_warned:
            metrics_truncated_warned = True
            warnings.warn(f"observations longer than buffer.max_obs_tokens={codec.max_obs_tokens} are being cut "
                          f"({cfg.prompt.obs_truncation}); counted in charts/obs_truncated", stacklevel=1)
        metrics.update({"charts/updates": updates, "charts/obs_truncated": codec.truncated_count})
        if cfg.eval.every and collector.env_steps >= next_eval:
            metrics.update(run_eval())
            next_eval += cfg.eval.every
        logger.log(collector.env_steps, metrics)
        if cfg.checkpoint.every and collector.env_steps >= next_ckpt:
            next_ckpt += cfg.checkpoint.every
            checkpoint()

    final = run_eval()
    logger.log(collector.env_steps, final)
    checkpoint()
    logger.close()
    vec.close()
    success = final.get("eval/greedy/success", 0.0)
    print(f"final greedy success {success:.3f} after {collector.env_steps} env steps and {updates} updates; "
          f"run folder {run_dir}")
    return success


if __name__ == "__main__":
    main()
