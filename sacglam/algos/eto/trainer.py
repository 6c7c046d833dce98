"""``python train.py algo=eto``: ETO's rounds in the shared harness (docs/design/ALGORITHM.md section 7).

    expert  -> the env's expert plays the training tasks (the warm start's data and the pairs' references)
    sft     -> behaviour cloning on ``warm_start_episodes`` expert trajectories, ``sft_epochs`` epochs; evaluate
    round r -> explore: the policy plays every training task once (greedy, or sampled)
               pair:    per task, explored vs reference (``sacglam.algos.eto.dpo.make_pairs``); written to
               pairs/round<r>.jsonl
               DPO:     ``epochs`` epochs of the sigmoid DPO loss against the policy the round starts from
               evaluate, log one line at the round's env-step count

Evaluation: after the warm start, at the end of the first round at or past each ``eval.every`` env steps, and at the
end. Every env step of the expert and of exploration counts toward ``total_env_steps`` (reported apart as
``charts/expert_env_steps`` and ``charts/explore_env_steps``); evaluation episodes do not count, as for SAC and PPO.
Rounds stop at ``algo.rounds`` or when the budget is spent (exploration stops starting waves once it is).

With ``algo.pairs_file=PATH`` the run is the DPO phase alone on a user's pairs (ETO's conversation layout with
candidates, ``sacglam.algos.eto.dpo.read_pairs``): ``epochs`` epochs with round 0's beta and lr, then the usual
evaluation.

Checkpoints (``checkpoint.every`` > 0) are written at every phase boundary: after the expert, after each SFT and
DPO epoch, after exploration and at each round's end; ``resume=auto`` continues exactly (same metrics file, same
weights). ``checkpoint.every=0`` writes the final one only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sacglam.agent import Agent
from sacglam.algos.eto.dpo import (
    ETOConfig,
    Pair,
    best_trajectories,
    dpo_loss,
    make_pairs,
    pair_from_json,
    pair_logps,
    pair_to_json,
    read_pairs,
    reference_logps,
    sft_loss,
    trajectory_logp,
    write_pairs,
)
from sacglam.algos.eto.rollout import Task, TaskRunner, training_tasks
from sacglam.checkpoint import (
    capture_rng_state,
    check_run_state,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from sacglam.config import TrainConfig
from sacglam.episode_log import EpisodeLog
from sacglam.episodes import EpisodeRecord
from sacglam.logging import RunLogger
from sacglam.pipeline import make_act_fn
from sacglam.prompting import PromptCodec
from sacglam.run.builders import build_model, make_agent, make_env_fn, make_evaluator, seed_everything

PAIRS_DIRNAME = "pairs"


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class ETOTrainer:
    """ETO's phases on one agent: a small state machine whose ``state_dict`` resumes it exactly.

    ``phase`` is ``expert`` -> ``sft`` -> ``warm_eval`` -> (``explore`` -> ``dpo`` -> ``round_eval``) per round ->
    ``done``; ``epoch`` counts finished epochs of the current SFT or DPO phase.

    Args:
        cfg: ETO's options.
        agent: the policy (its online actor is trained; ``Agent.actor_parameters``).
        codec: the prompt codec the agent acts with.
        device: where the model is.
        first_seed, categories: the training tasks (``eto_rollout.training_tasks``; each explored once per round).
        runner: plays tasks (expert and policy).
        act_explore: the exploring policy (greedy or sampled).
        shuffle_gen: orders the SFT and DPO batches.
    """

    def __init__(self, cfg: ETOConfig, agent: Agent, codec: PromptCodec, device: torch.device, first_seed: int,
                 categories: Sequence[str], runner: TaskRunner | None, act_explore: Callable[..., Any] | None,
                 shuffle_gen: torch.Generator) -> None:
        self.cfg, self.agent, self.codec, self.device = cfg, agent, codec, device
        self.first_seed, self.categories = first_seed, list(categories)
        self.tasks: list[Task] = training_tasks(cfg.tasks, first_seed, self.categories) if runner is not None else []
        self.runner, self.act_explore, self.shuffle_gen = runner, act_explore, shuffle_gen
        self.phase = "expert"
        self.round = 0
        self.epoch = 0
        self.updates = 0
        self.expert_steps = 0
        self.explore_steps = 0
        self.expert: list[EpisodeRecord] = []
        self.best: dict[str, EpisodeRecord] = {}
        self.pairs: list[Pair] = []
        self.ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.round_metrics: dict[str, float] = {}  # this round's explore and pair numbers, logged at its end

    @property
    def env_steps(self) -> int:
        return self.expert_steps + self.explore_steps

    # ------------------------------------------------------------------------------------------------- phases
    def need_expert(self) -> int:
        """Expert episodes to play: the warm start's and, when pairing with the expert, one per training task."""
        return max(self.cfg.warm_start_episodes, len(self.tasks) if self.cfg.pair_with == "expert" else 0)

    def collect_expert(self, budget: int) -> list[EpisodeRecord]:
        """The expert plays ``need_expert()`` tasks (training tasks first, then more seeds for the warm start)."""
        assert self.runner is not None
        n = self.need_expert()
        if n == 0:  # no warm start, pairs with the best seen: the expert never plays
            return []
        plan = training_tasks(n, self.first_seed, self.categories)  # begins with self.tasks
        self.expert = self.runner.play(plan, None, budget=budget, tag="x", env_steps=0)
        self.expert_steps = sum(ep.length for ep in self.expert)
        if self.cfg.pair_with == "best":
            self.best = best_trajectories(self.expert[: len(self.tasks)])
        return self.expert

    def start_phase(self, lr: float) -> None:
        """A fresh optimizer for the next SFT or DPO phase (ETO trains each round as a new run from its start)."""
        self.optimizer = torch.optim.AdamW(self.agent.actor_parameters(), lr=lr, weight_decay=0.0)
        self.epoch = 0

    def _step(self, loss: torch.Tensor) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.agent.actor_parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1

    def sft_epoch(self) -> dict[str, float]:
        """One epoch of behaviour cloning on the first ``warm_start_episodes`` expert trajectories."""
        data = self.expert[: self.cfg.warm_start_episodes]
        total, steps = 0.0, 0
        self.agent.train()
        for batch in _epoch_batches(len(data), self.cfg.sft_batch_size, self.shuffle_gen):
            eps = [data[i] for i in batch]
            logp = trajectory_logp(self.agent, self.codec, eps, self.device,
                                   max_steps_per_batch=self.cfg.max_steps_per_batch)
            lengths = torch.tensor([ep.length for ep in eps], device=logp.device)
            loss = sft_loss(logp, lengths)
            self._step(loss)
            total += float(loss.detach()) * int(lengths.sum())
            steps += int(lengths.sum())
        self.epoch += 1
        self.round_metrics = {"losses/sft": total / max(steps, 1)}
        return self.round_metrics

    def explore_and_pair(self, budget: int, run_dir: Path | None) -> list[EpisodeRecord]:
        """Play every training task once with the current policy (within ``budget`` env steps), pair the episodes
        with their tasks' references, compute the reference log-likelihoods, and start the round's optimizer."""
        assert self.runner is not None and self.act_explore is not None
        self.agent.eval()
        explored = self.runner.play(self.tasks, self.act_explore, budget=budget, tag=f"r{self.round}",
                                    env_steps=self.env_steps, policy_version=self.updates)
        self.agent.train()
        self.explore_steps += sum(ep.length for ep in explored)
        # pair_with=expert: one expert episode per task
        best = self.cfg.pair_with == "best"
        reference = self.best if best else best_trajectories(self.expert[: len(self.tasks)])
        self.pairs, stats = make_pairs(explored, reference, self.cfg.margin)
        if self.cfg.pair_with == "best":
            self.best = best_trajectories([*self.best.values(), *explored])
        if run_dir is not None:
            write_pairs(run_dir / PAIRS_DIRNAME / f"round{self.round}.jsonl", self.pairs)
        n = max(len(explored), 1)
        self.round_metrics = {
            "charts/round": float(self.round + 1), "charts/pairs": float(stats.pairs),
            "charts/pairs_ties": float(stats.ties), "charts/pairs_swapped": float(stats.swapped),
            "charts/pairs_missing": float(stats.missing), "charts/pairs_truncated": float(stats.truncated),
            "charts/explore_episodes": float(len(explored)),
            "charts/explore_success": sum(ep.success for ep in explored) / n,
        }
        self.prepare_dpo(self.cfg.lr(self.round))
        self.phase = "dpo"
        return explored

    def prepare_dpo(self, lr: float) -> None:
        """The round's reference values (the policy as it is now, no dropout) and a fresh optimizer."""
        self.ref = reference_logps(self.agent, self.codec, self.pairs, self.device,
                                   max_steps_per_batch=self.cfg.max_steps_per_batch) if self.pairs else None
        self.start_phase(lr)

    def dpo_epoch(self, beta: float) -> dict[str, float]:
        """One epoch of DPO over the round's pairs, in shuffled batches of ``batch_size``; the epoch's means over pairs
        (each batch's values before its step): loss, reward margin, pair accuracy, and the implicit rewards of the
        chosen and rejected sides, whose signs show whether DPO raised the chosen trajectories or only lowered the
        rejected ones."""
        sums = {"losses/dpo": 0.0, "charts/reward_margin": 0.0, "charts/pair_accuracy": 0.0,
                "charts/chosen_reward": 0.0, "charts/rejected_reward": 0.0, "losses/dpo_sft": 0.0}
        self.agent.train()
        if self.pairs:
            assert self.ref is not None
            for batch in _epoch_batches(len(self.pairs), self.cfg.batch_size, self.shuffle_gen):
                pairs = [self.pairs[i] for i in batch]
                pi_c, pi_r = pair_logps(self.agent, self.codec, pairs, self.device,
                                        max_steps_per_batch=self.cfg.max_steps_per_batch)
                index = torch.tensor(batch, device=self.ref[0].device)
                out = dpo_loss(pi_c, pi_r, self.ref[0][index], self.ref[1][index], beta)
                loss = out.loss
                if self.cfg.sft_coef > 0:
                    lengths = torch.tensor([p.chosen.length for p in pairs], device=pi_c.device)
                    sft = sft_loss(pi_c, lengths)
                    loss = loss + self.cfg.sft_coef * sft
                    sums["losses/dpo_sft"] += float(sft.detach()) * len(batch)
                self._step(loss)
                sums["losses/dpo"] += float(out.loss.detach()) * len(batch)
                sums["charts/reward_margin"] += float(out.reward_margin) * len(batch)
                sums["charts/pair_accuracy"] += float(out.accuracy) * len(batch)
                sums["charts/chosen_reward"] += float(out.chosen_reward.sum())  # beta * (log pi - log ref), as TRL
                sums["charts/rejected_reward"] += float(out.rejected_reward.sum())
        self.epoch += 1
        n = len(self.pairs)
        metrics = {k: (v / n if n else math.nan) for k, v in sums.items()}
        if self.cfg.sft_coef == 0:
            del metrics["losses/dpo_sft"]
        return metrics

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase, "round": self.round, "epoch": self.epoch, "updates": self.updates,
            "expert_steps": self.expert_steps, "explore_steps": self.explore_steps,
            "expert": [ep.to_json() for ep in self.expert], "best": {k: v.to_json() for k, v in self.best.items()},
            "pairs": [pair_to_json(p) for p in self.pairs], "ref": self.ref,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "round_metrics": dict(self.round_metrics),
        }

    def load_state_dict(self, state: dict[str, Any], lr: float) -> None:
        self.phase, self.round, self.epoch = state["phase"], int(state["round"]), int(state["epoch"])
        self.updates = int(state["updates"])
        self.expert_steps, self.explore_steps = int(state["expert_steps"]), int(state["explore_steps"])
        self.expert = [EpisodeRecord.from_json(e) for e in state["expert"]]
        self.best = {k: EpisodeRecord.from_json(v) for k, v in state["best"].items()}
        self.pairs = [pair_from_json(p) for p in state["pairs"]]
        self.ref = state["ref"]
        self.round_metrics = dict(state["round_metrics"])
        self.optimizer = None
        if state["optimizer"] is not None:
            epoch = self.epoch
            self.start_phase(lr)
            self.epoch = epoch
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])


def _task_seeds(cfg: TrainConfig, eto: ETOConfig) -> int:
    """The first training-task seed (``seed * tasks``: each run seed its own tasks), checked disjoint from the
    evaluation seeds."""
    first = cfg.seed * eto.tasks
    n = max(eto.tasks, eto.warm_start_episodes)
    eval_n = cfg.eval.episodes_per_category * 64  # generous: the evaluation plan's seeds lie below this
    if first < cfg.eval.seed + eval_n and cfg.eval.seed < first + n:
        raise ValueError(f"ETO's training tasks use env seeds {first}..{first + n - 1}, which overlap the evaluation "
                         f"seeds from eval.seed={cfg.eval.seed}; choose another seed or eval.seed")
    return first


def run_eto(cfg: TrainConfig, dcfg: DictConfig, run_dir: Path, device: torch.device) -> float:
    """Train with ETO (or run DPO on ``algo.pairs_file``); returns the final greedy success."""
    eto: ETOConfig = cfg.algo
    seed_everything(cfg.seed)
    env_fn = make_env_fn(cfg)
    probe = env_fn()
    model, _, codec = build_model(cfg, probe, device)
    agent = make_agent(cfg, model, device)
    assert isinstance(agent, Agent)
    act_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 2)
    generators = {"act": act_gen, "shuffle": shuffle_gen}
    user_pairs = read_pairs(eto.pairs_file) if eto.pairs_file else None
    if user_pairs is not None and not user_pairs:
        raise ValueError(f"algo.pairs_file={eto.pairs_file} holds no pair")
    runner = TaskRunner(env_fn, cfg.env.num_envs) if user_pairs is None else None
    act_explore = make_act_fn(agent, codec, greedy=eto.explore == "greedy", device=device, generator=act_gen)
    trainer = ETOTrainer(eto, agent, codec, device, _task_seeds(cfg, eto), list(probe.goal_categories), runner,
                         act_explore, shuffle_gen)
    run_eval = make_evaluator(cfg, agent, codec, probe, device)

    ckpt_path = resolve_resume(cfg.resume, run_dir)
    next_eval, logged = cfg.eval.every, -1  # logged: the env step of the last metrics line written
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path, map_location=device, weights_only=False)  # our own file
        check_run_state(state, ckpt_path, "eto")
        agent.load_state_dict(state["agent"])
        phase_lr = eto.sft_lr if state["eto"]["phase"] == "sft" else eto.lr(int(state["eto"]["round"]))
        trainer.load_state_dict(state["eto"], phase_lr)
        restore_rng_state(state["rng"], generators=generators)
        next_eval, logged = state["loop"]
        print(f"resumed from {ckpt_path}: phase {trainer.phase}, round {trainer.round}, epoch {trainer.epoch}, "
              f"env step {trainer.env_steps}")
    logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(dcfg, resolve=True), cfg.total_env_steps,  # type: ignore[arg-type]
                       resume_from_step=logged if ckpt_path is not None else None)
    episode_log = EpisodeLog(run_dir, cfg.logger.episodes_max_mb, trainer.env_steps if ckpt_path else None
                             ) if cfg.logger.episodes else None

    def checkpoint(final: bool = False) -> None:
        if cfg.checkpoint.every or final:
            state = {"algo": "eto", "agent": agent.state_dict(), "eto": trainer.state_dict(),
                     "rng": capture_rng_state(generators=generators), "loop": (next_eval, logged)}
            save_checkpoint(run_dir, trainer.env_steps, state, keep=cfg.checkpoint.keep)

    def log(metrics: dict[str, float]) -> None:
        nonlocal logged
        metrics.update({"charts/updates": float(trainer.updates), "charts/expert_env_steps": trainer.expert_steps,
                        "charts/explore_env_steps": trainer.explore_steps})
        logger.log(trainer.env_steps, metrics)
        logged = trainer.env_steps

    def write_episodes(records: Sequence[EpisodeRecord]) -> None:
        if episode_log is not None and records:
            episode_log.write(records)

    start, last_eval = time.monotonic(), None
    while trainer.phase != "done":
        if cfg.time_limit_min and time.monotonic() - start > 60 * cfg.time_limit_min:
            print(f"time limit of {cfg.time_limit_min} min reached at env step {trainer.env_steps}")
            break
        if trainer.phase == "expert":
            if user_pairs is not None:  # DPO on the user's file: no env step, one DPO phase
                trainer.pairs = user_pairs
                trainer.prepare_dpo(eto.lr(0))
                trainer.phase = "dpo"
            else:
                write_episodes(trainer.collect_expert(cfg.total_env_steps))
                trainer.start_phase(eto.sft_lr)
                trainer.phase = "sft" if eto.warm_start_episodes else "warm_eval"
        elif trainer.phase == "sft":
            if trainer.epoch < eto.sft_epochs:
                sft_metrics = trainer.sft_epoch()
                print(f"warm start: SFT epoch {trainer.epoch}/{eto.sft_epochs}, loss {sft_metrics['losses/sft']:.4f}")
            if trainer.epoch >= eto.sft_epochs:
                trainer.phase = "warm_eval"
        elif trainer.phase == "warm_eval":
            last_eval = run_eval()
            log({**trainer.round_metrics, **last_eval})  # the warm-started policy: the curve's first point
            next_eval = trainer.env_steps + cfg.eval.every
            trainer.phase = "explore"
        elif trainer.phase == "explore":
            if trainer.round >= eto.rounds or trainer.env_steps >= cfg.total_env_steps:
                trainer.phase = "done"
                continue
            explored = trainer.explore_and_pair(cfg.total_env_steps - trainer.env_steps, run_dir)
            write_episodes(explored)
            m = trainer.round_metrics
            print(f"round {trainer.round + 1}: explored {len(explored)} tasks ({trainer.env_steps} env steps), "
                  f"success {m['charts/explore_success']:.3f}, {int(m['charts/pairs'])} pairs")
        elif trainer.phase == "dpo":
            beta = eto.beta(trainer.round)
            if trainer.epoch < eto.epochs:
                dpo_metrics = trainer.dpo_epoch(beta)
                trainer.round_metrics.update(dpo_metrics)
                print(f"round {trainer.round + 1}: DPO epoch {trainer.epoch}/{eto.epochs}, loss "
                      f"{dpo_metrics['losses/dpo']:.4f}, margin {dpo_metrics['charts/reward_margin']:.4f}, "
                      f"accuracy {dpo_metrics['charts/pair_accuracy']:.3f}")
            if trainer.epoch >= eto.epochs:
                trainer.phase = "round_eval"
        elif trainer.phase == "round_eval":
            metrics = dict(trainer.round_metrics)
            last = user_pairs is not None or trainer.round + 1 >= eto.rounds or \
                trainer.env_steps >= cfg.total_env_steps
            if last or (cfg.eval.every and trainer.env_steps >= next_eval):  # eval.every=0: at the end only
                last_eval = run_eval()
                metrics.update(last_eval)
                while cfg.eval.every and next_eval <= trainer.env_steps:
                    next_eval += cfg.eval.every
            else:
                last_eval = None
            log(metrics)
            trainer.round += 1
            trainer.optimizer, trainer.ref, trainer.pairs = None, None, []
            trainer.phase = "done" if user_pairs is not None else "explore"
        checkpoint()

    if last_eval is None:  # stopped by the time limit, or the last round was not evaluated
        last_eval = run_eval()
        if trainer.env_steps > logged:
            log(dict(last_eval))
    checkpoint(final=True)
    logger.close()
    if runner is not None:
        runner.close()
    if episode_log is not None:
        episode_log.close()
    success = last_eval.get("eval/greedy/success", 0.0)
    print(f"final greedy success {success:.3f} after {trainer.env_steps} env steps ({trainer.expert_steps} expert, "
          f"{trainer.explore_steps} exploring) and {trainer.updates} updates; run folder {run_dir}")
    return success


__all__ = ["PAIRS_DIRNAME", "ETOTrainer", "run_eto"]
