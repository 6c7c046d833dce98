"""ETO's phases on one agent (docs/design/ALGORITHM.md section 7): :class:`ETOTrainer`, a state machine that
``sacglam.algos.eto.run.run_eto`` drives through the shared run harness (``python train.py algo=eto``).

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
weights). ``checkpoint.every=0`` writes the final one only. ``time_limit_min`` stops the run at a phase boundary
with a final evaluation and checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

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
    reference_logps,
    sft_loss,
    trajectory_logp,
    write_pairs,
)
from sacglam.algos.eto.rollout import Task, TaskRunner, training_tasks
from sacglam.algos.optim import GradientStep, ParamGroup
from sacglam.episodes import EpisodeRecord
from sacglam.prompting import PromptCodec

PAIRS_DIRNAME = "pairs"
# Every SFT and DPO step (stateless); its error ends with this advice.
ETO_STEP = GradientStep("ETO", "lower the learning rate (algo.sft_lr for behaviour cloning, algo.lrs for DPO) or set "
                               "algo.max_grad_norm > 0")


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

    def _step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], where: str) -> None:
        """One optimizer step on a batch's loss through the shared step (:class:`sacglam.algos.optim.GradientStep`).

        The batch is one micro-batch (its forward pass is already done, so nothing is accumulated) and ETO runs in
        one process (nothing to average); the actor's gradient norm is clipped to ``max_grad_norm`` (0 = none), and
        ``terms``, the loss and the gradient norm are checked for NaN/inf before the step.

        Args:
            loss: 0-d, with gradient; terms: its named 0-d parts (detached); where: the batch, for an error.

        Raises:
            NonFiniteLossError: a NaN/inf value; no optimizer step was taken and ``updates`` is unchanged.
        """
        assert self.optimizer is not None
        group = ParamGroup(self.agent.actor_parameters(), self.optimizer, self.cfg.max_grad_norm, "charts/grad_norm")
        ETO_STEP.run(self.updates, [lambda: (loss, terms)], [group], context=lambda: where)
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
            self._step(loss, {"losses/sft": loss.detach()},
                       f"behaviour cloning epoch {self.epoch} on {len(eps)} expert trajectories")
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
                terms = {"losses/dpo": out.loss.detach()}
                if self.cfg.sft_coef > 0:
                    lengths = torch.tensor([p.chosen.length for p in pairs], device=pi_c.device)
                    sft = sft_loss(pi_c, lengths)
                    loss = loss + self.cfg.sft_coef * sft
                    sums["losses/dpo_sft"] += float(sft.detach()) * len(batch)
                    terms["losses/dpo_sft"] = sft.detach()
                self._step(loss, terms, f"DPO round {self.round} epoch {self.epoch} on {len(pairs)} pairs")
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


__all__ = ["PAIRS_DIRNAME", "ETOTrainer"]
