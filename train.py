"""Train an LLM agent in a text environment: discrete soft actor-critic with hindsight relabelling, PPO-GLAM or ETO.

    python train.py                                   # Playground-Text, tiny model, SAC + HER (the default)
    python train.py algo=ppo                          # the same with PPO-GLAM (on-policy rollouts)
    python train.py experiment=playground_eto         # ETO: expert warm start, then explore -> pair -> DPO rounds
    python train.py algo=eto algo.pairs_file=P.jsonl  # DPO alone on one's own trajectory pairs (ETO's layout)
    python train.py experiment=bitflip_her seed=3     # any preset in conf/experiment, any field as key=value
    python train.py resume=auto hydra.run.dir=outputs/run1

The loop: collect one vector step -> the algorithm's learner observes it (SAC: replay buffer + sampled updates; PPO:
rollout storage + an update per full rollout; ``sacglam.algos.base.Learner``) -> log / evaluate / checkpoint. Resume,
logs, checkpoints, the time limit, evaluation and closing are the run harness's (``sacglam.run.harness.RunContext``),
shared with ETO, whose rounds of explore -> pair -> DPO replace this step loop (``sacglam.algos.eto.run``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from envs.vector import make_vector_env
from sacglam.algos.base import Learner
from sacglam.algos.eto.config import ETOConfig
from sacglam.algos.eto.run import run_eto
from sacglam.algos.sac.learner import NonFiniteLossError
from sacglam.checkpoint import agent_state, capture_rng_state, load_agent_state, restore_rng_state
from sacglam.collector import Collector, episode_metrics
from sacglam.config import ConfigError, register_configs
from sacglam.curriculum import ALPCurriculum, make_curriculum, resume_curriculum
from sacglam.distributed import rank_seed
from sacglam.episodes import EpisodeTracker
from sacglam.prompting import PromptCodec
from sacglam.run.builders import (
    build_model,
    check_sizes,
    env_state,
    make_env_fn,
    make_evaluator,
    make_learner,
    seed_everything,
)
from sacglam.run.harness import RunContext, print_main
from sacglam.types import TextStep

register_configs()


@dataclass
class StepRun:
    """The step loop's parts (SAC and PPO) and its schedule: the next env steps to evaluate and checkpoint at."""

    ctx: RunContext
    vec: Any
    collector: Collector
    tracker: EpisodeTracker  # finished episodes as text, for the learner and the episode log
    curriculum: ALPCurriculum | None  # curriculum=alp: goal-category weights from learning progress (None: uniform)
    agent: Any
    learner: Learner
    codec: PromptCodec
    next_eval: int
    next_ckpt: int
    warned: set[str] = field(default_factory=set)

    def steps(self) -> int:
        """The run's env steps: every rank steps its own N envs."""
        return self.collector.env_steps * self.ctx.dist.world


def build(ctx: RunContext) -> StepRun:
    """Envs, model, agent and learner of this process (its own env and sampling seeds, its share of the batch, its
    own replay-buffer shard); the evaluation goes to ``ctx.evaluator``."""
    cfg, device = ctx.cfg, ctx.device
    seed_everything(cfg.seed)  # the same model on every rank
    probe = make_env_fn(cfg)()
    curriculum = make_curriculum(cfg.curriculum, probe, cfg.env.id, cfg.env.kwargs)
    vec = make_vector_env(cfg.env.id, cfg.env.num_envs, env_kwargs=dict(cfg.env.kwargs), mode=cfg.env.vector)
    model, _, codec = build_model(cfg, probe, device)
    print_main(ctx.dist, check_sizes(cfg, probe, codec))  # a too-small token width stops the run here, not minutes in
    agent, learner = make_learner(cfg, model, codec, probe, device, ctx.dist, overrides=ctx.overrides)
    collector = Collector(vec, learner.act, seed=rank_seed(cfg.seed, ctx.dist.rank))
    ctx.evaluator = make_evaluator(cfg, agent, codec, probe, device)  # greedy (and sampled) success per category
    return StepRun(ctx, vec, collector, EpisodeTracker(cfg.env.num_envs), curriculum, agent, learner, codec,
                   next_eval=cfg.eval.every, next_ckpt=cfg.checkpoint.every)


def resume(run: StepRun, state: dict[str, Any]) -> None:
    """Continue exactly from a checkpoint's state (envs that could not be saved restart their episodes)."""
    load_agent_state(run.agent, state, run.ctx.resumed_from or "the checkpoint", run.ctx.cfg.model.name)
    run.learner.load_state_dict(state["learner"])
    if state["envs"] is not None:
        run.vec.set_state(state["envs"])
    run.collector.load_state_dict(state["collector"], envs_restored=state["envs"] is not None)
    if "episodes" in state:
        run.tracker.load_state_dict(state["episodes"])
    if state["envs"] is None:
        run.tracker.drop_running()
    resume_curriculum(run.curriculum, state.get("curriculum"), run.ctx.resumed_from)  # (older checkpoints: none)
    restore_rng_state(state["rng"], generators=run.learner.generators)
    run.next_eval, run.next_ckpt = state["loop"]
    print_main(run.ctx.dist, f"resumed from {run.ctx.resumed_from} at env step {run.steps()}")


def checkpoint(run: StepRun) -> None:
    """Save this rank's checkpoint at the run's env step (every rank together)."""
    curriculum = run.curriculum.state_dict() if run.curriculum is not None else None
    cfg = run.ctx.cfg
    run.ctx.save(run.steps(), {
        **agent_state(run.agent, cfg.model.name, lean=cfg.checkpoint.lean),  # "agent" (and a frozen base's "base")
        "learner": run.learner.state_dict(), "collector": run.collector.state_dict(),
        "envs": env_state(run.vec), "episodes": run.tracker.state_dict(), "curriculum": curriculum,
        "rng": capture_rng_state(generators=run.learner.generators), "loop": (run.next_eval, run.next_ckpt)})


def observe(run: StepRun, step: TextStep, records: list[Any]) -> dict[str, Any]:
    """The learner's update stats of this step; a non-finite loss stops the run naming its last good checkpoint."""
    try:
        return dict(run.learner.observe(step, records))
    except NonFiniteLossError as exc:
        raise RuntimeError(f"stopped at env step {run.collector.env_steps}: {exc} Last good checkpoint: "
                           f"{run.ctx.latest_checkpoint() or 'none'} (continue with resume=auto).") from exc


def codec_metrics(run: StepRun) -> dict[str, Any]:
    """``charts/updates`` and the prompt codec's counters, warning once about each kind of damaged prompt."""
    codec, cfg = run.codec, run.ctx.cfg
    if codec.truncated_count and "cut" not in run.warned:
        run.warned.add("cut")
        warnings.warn(f"observations longer than buffer.max_obs_tokens={codec.max_obs_tokens} are being cut "
                      f"({cfg.prompt.obs_truncation}); counted in charts/obs_truncated", stacklevel=1)
    if codec.unfaithful_count and "unfaithful" not in run.warned:
        run.warned.add("unfaithful")
        warnings.warn("some prompt text merges across the template's cuts, so its ids differ from the tokenizer's "
                      "on the whole text (PromptCodec); counted in charts/unfaithful_tokenisation", stacklevel=1)
    return {"charts/updates": run.learner.updates, "charts/obs_truncated": codec.truncated_count,
            "charts/unfaithful_tokenisation": codec.unfaithful_count}


def loop_step(run: StepRun) -> bool:
    """One vector step: collect, let the learner observe it, log, evaluate and checkpoint when due. Returns whether
    the time limit stops the run here (agreed by every rank, so all stop at the same step)."""
    ctx, cfg, dist = run.ctx, run.ctx.cfg, run.ctx.dist
    step, episodes = run.collector.step()
    records = run.tracker.add(step, episodes, policy_version=run.learner.updates, env_steps=run.steps())
    ctx.write_episodes(records)
    shared = dist.gather((episodes, ctx.time_up()))  # every rank's finished episodes and time-limit verdict
    episodes = [e for part, _ in shared for e in part]
    metrics: dict[str, Any] = episode_metrics(episodes) if episodes else {}
    if run.curriculum is not None and episodes:  # every rank: the same pooled episodes, so the same p everywhere
        run.curriculum.update(episodes)
        run.vec.call("set_goal_weights", run.curriculum.weights())  # this step's auto-resets drew from the old p
    metrics.update(observe(run, step, records))
    metrics.update(codec_metrics(run))
    if run.curriculum is not None:
        metrics.update(run.curriculum.metrics())
    if episodes:  # (every rank's episodes: all ranks call the learner's collectives, or none)
        metrics.update(run.learner.extra_metrics(dist.gather))
    if cfg.eval.every and run.steps() >= run.next_eval:
        if dist.is_main:  # evaluation runs once; the other ranks wait at the next collective
            metrics.update(ctx.evaluate())
            metrics["perf/minutes"] = ctx.minutes()  # this process's wall clock, evaluations included
        run.next_eval += cfg.eval.every
    ctx.log(run.steps(), metrics)
    if cfg.checkpoint.every and run.steps() >= run.next_ckpt:
        run.next_ckpt += cfg.checkpoint.every
        checkpoint(run)
    if any(up for _, up in shared):
        ctx.announce_time_limit(run.steps())
        return True
    return False


def finish(run: StepRun) -> float:
    """The final evaluation, checkpoint and metrics row; returns the final greedy success (0.0 off rank 0)."""
    final = run.ctx.evaluate()
    final["perf/minutes"] = run.ctx.minutes()
    checkpoint(run)  # (after a background relabeller's last episodes are in the buffer and counted)
    final.update(run.learner.extra_metrics(run.ctx.dist.gather))
    run.vec.close()
    run.ctx.log(run.steps(), final)
    return run.ctx.close(final, f"after {run.steps()} env steps and {run.learner.updates} updates")


def train(dcfg: DictConfig) -> float:
    """Run the composed configuration to its end (or time limit); returns the final greedy success."""
    hydra_cfg = HydraConfig.get()  # (sacglam never reads Hydra's global state: what it needs is passed on)
    ctx = RunContext.start(dcfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg.overrides.task)
    if isinstance(ctx.cfg.algo, ETOConfig):
        return run_eto(ctx)  # rounds of explore -> pair -> DPO instead of this step loop
    run = build(ctx)
    state = ctx.load_resume()  # the newest complete checkpoint of the run folder (resume=auto)
    if state is not None:
        resume(run, state)
    if run.curriculum is not None:  # the envs draw from p from their next reset on (no RNG is used to set it)
        run.vec.call("set_goal_weights", run.curriculum.weights())
    ctx.open_logs(state, log_step=run.steps(), episode_step=run.steps())
    ctx.start_clock()
    while run.steps() < ctx.cfg.total_env_steps:
        if loop_step(run):
            break
    return finish(run)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    """:func:`train` under Hydra. An option outside its domain (``sacglam.validate.ConfigError``, raised when the
    typed config is built or the run's parts are) stops the run with its message alone, no traceback."""
    try:
        return train(dcfg)
    except ConfigError as exc:
        raise CompactHydraException(str(exc)) from None


if __name__ == "__main__":
    main()
