"""What a run is built from, shared by ``train.py`` and the scripts that rebuild a run (``sacglam/run/tools.py``):
env factories, the model with its tokenizer and prompt codec, the agent, the algorithm's learner (with its replay
buffer, step encoder and achieved-goal relabeller, given this process's data-parallel place and shares) and the
evaluation envs.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import gymnasium
import numpy as np
import torch

from sacglam.agent import Agent
from sacglam.algos.ppo.learner import PPOAgent, PPOConfig, PPOLearner, check_on_policy
from sacglam.algos.sac.learner import SACConfig, SACLearner
from sacglam.config import TrainConfig
from sacglam.distributed import Dist, rank_seed
from sacglam.evaluate import evaluate_splits
from sacglam.models import is_seq2seq, load_model
from sacglam.pipeline import StepEncoder, check_context, make_act_fn, tokenizer_corpus
from sacglam.prompting import PromptCodec
from sacglam.relabel import GoalSpace, OnlineRelabeller, RelabelStats, make_source
from sacglam.replay.buffer import ReplayBuffer
from sacglam.run.sizes import check_text_sizes, summary


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



def make_evaluator(cfg: TrainConfig, agent: Any, codec: PromptCodec, probe: Any,
                   device: torch.device) -> Callable[[], dict[str, float]]:
    """The run's evaluation as a function of no argument: greedy (and, with ``eval.sample``, sampled from a generator
    reseeded every time) on ``eval_env_fns(cfg)``, ``eval.episodes_per_category`` episodes per goal category of
    ``probe``; the agent is in eval mode during it and back in train mode after."""
    act_greedy = make_act_fn(agent, codec, greedy=True, device=device)
    eval_gen = torch.Generator(device)
    act_sample = make_act_fn(agent, codec, greedy=False, device=device, generator=eval_gen) if cfg.eval.sample \
        else None

    def run_eval() -> dict[str, float]:
        agent.eval()
        try:
            return evaluate_splits(eval_env_fns(cfg), act_greedy, act_sample, eval_gen,
                                   categories=probe.goal_categories, num_envs=cfg.eval.num_envs,
                                   episodes_per_category=cfg.eval.episodes_per_category, seed=cfg.eval.seed)
        finally:
            agent.train()

    return run_eval



def check_sizes(cfg: TrainConfig, probe: Any, codec: PromptCodec) -> str:
    """The start-up check of the buffer's token widths (``sacglam.run.sizes``) on ``probe`` and on every evaluation
    env that differs from it; returns its one-line report.

    Raises:
        ValueError: a width is too small for what the envs produce (names each ``buffer.*`` and the value needed).
    """
    if cfg.env.preflight_episodes == 0:
        return "token widths: not checked at start-up (env.preflight_episodes=0)"
    envs: dict[str, Any] = {"training": probe}
    for prefix, fn in eval_env_fns(cfg).items():
        if prefix or cfg.env.eval_kwargs:  # the plain evaluation env is the training env unless eval_kwargs differ
            envs[f"{prefix.rstrip('/')} evaluation".strip()] = fn  # "evaluation", "heldout evaluation"
    sizes = check_text_sizes(cfg.env.id, envs, codec, cfg.env.preflight_episodes, seed=cfg.seed + 54321)
    return f"token widths checked over {cfg.env.preflight_episodes} episodes per env: {summary(sizes, codec)}"



def rank_config(cfg: TrainConfig, dist: Dist) -> TrainConfig:
    """This process's part of a data-parallel run's options: its env and sampling seed (``rank_seed``), its share of
    the replay batch and of ``learning_starts`` (it samples its own buffer shard) and, for PPO, its share of every
    minibatch of its own rollout. One process: ``cfg`` itself.

    ``check_data_parallel`` has refused shares that do not divide evenly.
    """
    if dist.world == 1:
        return cfg
    local = replace(cfg, seed=rank_seed(cfg.seed, dist.rank), batch_size=cfg.batch_size // dist.world,
                    learning_starts=cfg.learning_starts // dist.world)
    if isinstance(cfg.algo, PPOConfig):
        local = replace(local, algo=replace(cfg.algo, minibatch_size=cfg.algo.minibatch_size // dist.world))
    return local


def make_learner(cfg: TrainConfig, model: Any, codec: PromptCodec, probe: Any, device: torch.device,
                 dist: Dist | None = None, *, overrides: Sequence[str] = ()) -> tuple[Any, SACLearner | PPOLearner]:
    """The agent and the part of the loop that differs per algorithm (a :class:`sacglam.algos.base.Learner`):
    ``learner.act`` acts for the collector and ``learner.observe(step)`` stores the step and updates when it is time.

    ``cfg`` is the run's configuration; with ``dist`` (this process of a data-parallel run) the learner is built from
    this rank's part of it (``rank_config``: seeds, batch and minibatch shares) and takes part in the collectives
    its updates need (SAC: when to start updating; PPO: averaged gradients and statistics).

    ``overrides`` are the command line's ``key=value`` overrides (``train.py`` passes Hydra's ``overrides.task``):
    PPO refuses the replay-buffer options among them (``check_on_policy``).
    """
    dist = dist if dist is not None else Dist()
    cfg = rank_config(cfg, dist)
    act_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    agent = make_agent(cfg, model, device)
    if isinstance(agent, PPOAgent) and isinstance(cfg.algo, PPOConfig):
        check_on_policy(overrides, cfg.buffer.her.ratio, cfg.buffer.her.rare_fraction)
        if cfg.relabel.source != "oracle":
            raise ValueError(f"relabel.source={cfg.relabel.source} feeds hindsight relabelling, which algo=ppo "
                             "does not do; use algo=sac (or leave relabel.source=oracle)")
        shuffle_gen = torch.Generator().manual_seed(cfg.seed + 2)
        return agent, PPOLearner(agent, cfg.algo, codec, cfg.env.num_envs, device, act_gen, shuffle_gen, dist=dist)
    assert isinstance(agent, Agent) and isinstance(cfg.algo, SACConfig)
    buffer_device = device if cfg.buffer.device == "auto" else cfg.buffer.device  # e.g. keep the buffer on the CPU
    buffer = ReplayBuffer(cfg.buffer, cfg.env.num_envs, pad_id=codec.pad_id, device=buffer_device, prompt=codec)
    relabeller = make_relabeller(cfg, probe)
    encoder = StepEncoder(codec, buffer, probe.goal_step_limit, cfg.buffer.max_achieved, relabeller is None)
    sample_gen = torch.Generator(buffer.device).manual_seed(cfg.seed + 2)
    return agent, SACLearner(agent, cfg.algo, buffer, encoder, codec, batch_size=cfg.batch_size,
                             replay_ratio=cfg.replay_ratio, learning_starts=cfg.learning_starts, device=device,
                             act_generator=act_gen, sample_generator=sample_gen, relabeller=relabeller, dist=dist)


def make_relabeller(cfg: TrainConfig, probe: Any) -> OnlineRelabeller | None:
    """The achieved-goal source of ``relabel.source`` run as episodes end (None for ``oracle``: the env's goals are
    stored as they come)."""
    if cfg.relabel.source == "oracle":
        return None
    space = GoalSpace.from_env(probe)
    source = make_source(cfg.relabel, probe, cfg.env.rules, space)
    background = cfg.relabel.source == "llm" and cfg.relabel.llm.background
    return OnlineRelabeller(source, RelabelStats(space), background=background,
                            max_pending=cfg.relabel.llm.max_pending)



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


__all__ = [
    "build_model",
    "env_state",
    "eval_env_fns",
    "make_agent",
    "make_codec",
    "make_env_fn",
    "make_evaluator",
    "make_learner",
    "make_relabeller",
    "model_codec",
    "rank_config",
    "resolve_device",
    "seed_everything",
]
