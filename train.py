"""Train an LLM agent in a text environment: discrete soft actor-critic with hindsight relabelling, PPO-GLAM or ETO.

    python train.py                                   # Playground-Text, tiny model, SAC + HER (the default)
    python train.py algo=ppo                          # the same with PPO-GLAM (on-policy rollouts)
    python train.py experiment=playground_eto         # ETO: expert warm start, then explore -> pair -> DPO rounds
    python train.py algo=eto algo.pairs_file=P.jsonl  # DPO alone on one's own trajectory pairs (ETO's layout)
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

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from envs.vector import make_vector_env
from sacglam.algos.eto.dpo import ETOConfig
from sacglam.algos.eto.trainer import run_eto
from sacglam.algos.ppo.learner import PPOConfig, PPOLearner
from sacglam.algos.sac.learner import NonFiniteLossError, SACConfig, SACLearner
from sacglam.checkpoint import (
    capture_rng_state,
    check_run_state,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from sacglam.collector import Collector, episode_metrics
from sacglam.config import ALGOS, TrainConfig, register_configs
from sacglam.curriculum import make_curriculum, resume_curriculum
from sacglam.distributed import (
    check_data_parallel,
    init_distributed,
    rank_device,
    rank_dir,
    rank_seed,
    resolve_rank_resume,
)
from sacglam.episode_log import EpisodeLog
from sacglam.episodes import EpisodeTracker
from sacglam.logging import RunLogger
from sacglam.run.builders import (  # re-exported: scripts build runs through train.make_env_fn and the like
    build_model,
    env_state,
    eval_env_fns,
    make_agent,
    make_codec,
    make_env_fn,
    make_evaluator,
    make_learner,
    make_relabeller,
    model_codec,
    resolve_device,
    seed_everything,
)

__all__ = ["build_model", "env_state", "eval_env_fns", "main", "make_agent", "make_codec", "make_env_fn",
           "make_evaluator", "make_learner", "make_relabeller", "model_codec", "resolve_device", "seed_everything"]

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    if not isinstance(cfg.algo, (SACConfig, PPOConfig, ETOConfig)):
        raise ValueError(f"algo must be one of the conf/algo presets ({', '.join(ALGOS)}); got {cfg.algo!r}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed(device)  # one process, or this rank of a torchrun / accelerate launch / submitit job
    device = rank_device(device, dist)
    check_data_parallel(cfg, dist)
    if isinstance(cfg.algo, ETOConfig):
        return run_eto(cfg, dcfg, run_dir, device)  # rounds of explore -> pair -> DPO instead of this step loop
    seed_everything(cfg.seed)  # the same model on every rank

    # Environments, model, agent and the algorithm's own part of the loop.
    env_fn = make_env_fn(cfg)
    probe = env_fn()
    # curriculum=alp: goal-category weights from the learning progress of the training episodes (None: uniform).
    curriculum = make_curriculum(cfg.curriculum, probe, cfg.env.id, cfg.env.kwargs)
    vec = make_vector_env(cfg.env.id, cfg.env.num_envs, env_kwargs=dict(cfg.env.kwargs), mode=cfg.env.vector)
    model, _, codec = build_model(cfg, probe, device)
    # Each rank: its own env and sampling seeds, its share of the batch, its own replay-buffer shard.
    local = replace(cfg, seed=rank_seed(cfg.seed, dist.rank), batch_size=cfg.batch_size // dist.world,
                    learning_starts=cfg.learning_starts // dist.world)
    if isinstance(cfg.algo, PPOConfig):  # PPO: its share of every minibatch of its own rollout
        local = replace(local, algo=replace(cfg.algo, minibatch_size=cfg.algo.minibatch_size // dist.world))
    agent, learner = make_learner(local, model, codec, probe, device)
    if dist.world > 1 and isinstance(learner, SACLearner):
        learner.agree = lambda ready: all(dist.gather(ready))  # update only when every shard can
    if dist.world > 1 and isinstance(learner, PPOLearner):
        learner.updater.dist = dist
    collector = Collector(vec, learner.act, seed=local.seed)
    tracker = EpisodeTracker(cfg.env.num_envs)  # finished episodes as text, for the relabeller and episode log
    run_eval = make_evaluator(cfg, agent, codec, probe, device)  # greedy (and sampled) success per goal category

    # Resume: the newest complete checkpoint of the run folder (a corrupt one is skipped with a warning); with
    # several processes, the newest step every rank holds.
    ckpt_path = resolve_rank_resume(cfg.resume, run_dir, dist) if dist.world > 1 else resolve_resume(cfg.resume,
                                                                                                     run_dir)
    next_eval, next_ckpt = cfg.eval.every, cfg.checkpoint.every
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=device, weights_only=False)  # our own file
        check_run_state(state, ckpt_path, cfg.algo.name, dist.world)
        agent.load_state_dict(state["agent"])
        learner.load_state_dict(state["learner"])
        if state["envs"] is not None:
            vec.set_state(state["envs"])
        collector.load_state_dict(state["collector"], envs_restored=state["envs"] is not None)
        if "episodes" in state:
            tracker.load_state_dict(state["episodes"])
        if state["envs"] is None:
            tracker.drop_running()
        resume_curriculum(curriculum, state.get("curriculum"), ckpt_path)  # (older checkpoints have none)
        restore_rng_state(state["rng"], generators=learner.generators)
        next_eval, next_ckpt = state["loop"]
        if dist.is_main:
            print(f"resumed from {ckpt_path} at env step {collector.env_steps * dist.world}")
    if curriculum is not None:  # the envs draw from p from their next reset on (no RNG is used to set it)
        vec.call("set_goal_weights", curriculum.weights())
    steps = lambda: collector.env_steps * dist.world  # noqa: E731 - the global count: every rank steps N envs
    logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(dcfg, resolve=True), cfg.total_env_steps,  # type: ignore[arg-type]
                       resume_from_step=steps() if ckpt_path is not None else None,
                       keep_lines=state.get("metrics_lines") if ckpt_path is not None else None
                       ) if dist.is_main else None
    episode_log = EpisodeLog(run_dir, cfg.logger.episodes_max_mb, collector.env_steps if ckpt_path else None
                             ) if cfg.logger.episodes else None

    def checkpoint() -> None:
        state = {"algo": cfg.algo.name, "agent": agent.state_dict(), "learner": learner.state_dict(),
                 "collector": collector.state_dict(), "envs": env_state(vec), "episodes": tracker.state_dict(),
                 "curriculum": curriculum.state_dict() if curriculum is not None else None,
                 "rng": capture_rng_state(generators=learner.generators), "loop": (next_eval, next_ckpt),
                 "world": dist.world, "metrics_lines": logger.lines if logger is not None else None}
        save_checkpoint(rank_dir(run_dir, dist.rank), steps(), state, keep=cfg.checkpoint.keep)
        dist.barrier()  # every rank's shard is on disk before any goes on

    start, warned = time.monotonic(), set()
    while steps() < cfg.total_env_steps:
        # Collect one step of every env; the algorithm stores it and updates when it is time.
        step, episodes = collector.step()
        records = tracker.add(step, episodes, policy_version=learner.updates, env_steps=collector.env_steps)
        if episode_log is not None and records:
            episode_log.write(records)
        # Every rank's finished episodes, and the time-limit verdict, so that all ranks stop at the same step.
        time_up = bool(cfg.time_limit_min and time.monotonic() - start > 60 * cfg.time_limit_min)
        shared = dist.gather((episodes, time_up))
        episodes = [e for part, _ in shared for e in part]
        metrics: dict[str, Any] = episode_metrics(episodes) if episodes else {}
        if curriculum is not None and episodes:  # every rank: the same pooled episodes, so the same p everywhere
            curriculum.update(episodes)
            vec.call("set_goal_weights", curriculum.weights())  # this step's auto-resets drew from the old p
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
        if curriculum is not None:
            metrics.update(curriculum.metrics())
        if episodes and isinstance(learner, SACLearner):  # (episodes: every rank's, so all ranks gather or none)
            metrics.update(learner.relabel_metrics(dist.gather))
        if cfg.eval.every and steps() >= next_eval:
            if dist.is_main:  # evaluation runs once; the other ranks wait at the next collective
                metrics.update(run_eval())
                metrics["perf/minutes"] = (time.monotonic() - start) / 60  # this process's wall clock, evals included
            next_eval += cfg.eval.every
        if logger is not None:
            logger.log(steps(), metrics)
        if cfg.checkpoint.every and steps() >= next_ckpt:
            next_ckpt += cfg.checkpoint.every
            checkpoint()
        if any(up for _, up in shared):
            if dist.is_main:
                print(f"time limit of {cfg.time_limit_min} min reached at env step {steps()}")
            break

    final = run_eval() if dist.is_main else {}
    final["perf/minutes"] = (time.monotonic() - start) / 60
    checkpoint()  # (after a background relabeller's last episodes are in the buffer and counted)
    if isinstance(learner, SACLearner):
        final.update(learner.relabel_metrics(dist.gather))
    vec.close()
    if episode_log is not None:
        episode_log.close()
    if logger is None:
        return 0.0
    logger.log(steps(), final)
    logger.close()
    success = final.get("eval/greedy/success", 0.0)
    print(f"final greedy success {success:.3f} after {steps()} env steps and {learner.updates} updates; "
          f"run folder {run_dir}")
    return success


if __name__ == "__main__":
    main()
