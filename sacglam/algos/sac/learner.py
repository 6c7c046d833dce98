"""The discrete SAC update over candidate sets, with the hindsight supervised term (docs/design/ALGORITHM.md sections
3 and 9).

One call of :meth:`SACUpdater.update` on a sampled :class:`sacglam.types.Batch`:

1. target pass on the bootstrap state ``s_{t+k}`` (no gradient): ``y = R + discount * V_targ(s_{t+k})``;
2. online pass on ``s``: critic loss on ``Q_i(s, a)``, actor loss with exact expectations over ``A(s)``, temperature
   loss, and the hindsight term ``-log pi(a|s, g')`` on relabelled transitions;
3. the shared optimizer step (:class:`sacglam.algos.optim.GradientStep`, with accelerate's backward and clipping):
   one backward of the summed losses per micro-batch (``grad_accum``), gradients averaged over processes, clipping
   per parameter group (critic, actor), one finiteness check, Adam steps; then the Polyak target update.

The options (:class:`SACConfig`) live in the light ``sacglam.algos.sac.config`` (the Hydra schema imports them without
torch) and are re-exported here.

The first ``critic_warmup_updates`` updates train only the critic-only parameters (the heads, plus the critic adapter
with ``separate_adapter``): the policy, the shared trunk and ``log_alpha`` stay exactly unchanged meanwhile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator

from sacglam.agent import Agent
from sacglam.algos.optim import GradientStep, NonFiniteLossError, ParamGroup
from sacglam.algos.sac.config import SACConfig
from sacglam.distributed import Dist
from sacglam.episodes import EpisodeRecord
from sacglam.losses import (
    actor_loss,
    alpha_loss,
    critic_loss,
    critic_target,
    hindsight_bc_loss,
    soft_value,
    target_entropy,
)
from sacglam.pipeline import StepEncoder, make_act_fn
from sacglam.prompting import PromptCodec
from sacglam.relabel import OnlineRelabeller, RelabelJob, Relabelled
from sacglam.replay.buffer import ReplayBuffer
from sacglam.types import ActFn, Batch, TextStep, UpdateStats

SAC_ADVICE = ("check the batch for NaN/inf rewards, lower the learning rates or alpha_init, or enable grad_clip / "
              "huber")  # the end of NonFiniteLossError's "Fix:" sentence


def _batch_stats(batch: Batch) -> str:
    r, d = batch.reward.float(), batch.discount.float()
    return (
        f"size {len(batch)}, reward min {r.min().item():.4g} max {r.max().item():.4g}, "
        f"discount min {d.min().item():.4g} max {d.max().item():.4g}, "
        f"relabelled {int(batch.relabelled.sum().item())}"
    )


class SACUpdater:
    """Owns the optimizers and the temperature; updates an :class:`~sacglam.agent.Agent` from replay batches.

    Attributes:
        agent: the agent (moved to ``accelerator.device``).
        log_alpha: 0-d log entropy temperature (a leaf with gradient when ``alpha_mode == "auto"``).
        step: number of completed updates.
    """

    def __init__(self, agent: Agent, cfg: SACConfig, accelerator: Accelerator | None = None) -> None:
        """Build the optimizers (Adam) for the actor, the critic and alpha.

        Args:
            agent: the :class:`~sacglam.agent.Agent` to train.
            cfg: :class:`SACConfig`.
            accelerator: an ``accelerate.Accelerator``; a default one (single process) when None.

        The options' domains were checked when ``cfg`` was built (``SAC_DOMAINS``).

        Raises:
            ValueError: an agent with nothing to train.
        """
        self.cfg = cfg
        self.accelerator = accelerator if accelerator is not None else Accelerator()
        self.device = self.accelerator.device
        self.agent = agent.to(self.device)
        self.auto_alpha = cfg.alpha_mode == "auto"
        self.log_alpha = torch.tensor(
            math.log(cfg.alpha_init), device=self.device, dtype=torch.float32, requires_grad=self.auto_alpha
        )
        self.actor_params = agent.actor_parameters()
        self.critic_params = agent.critic_parameters()
        if not self.actor_params:
            raise ValueError("SACUpdater: the agent has no trainable policy parameter (all frozen?); unfreeze LoRA.")
        acc = self.accelerator
        self.actor_opt: Any = acc.prepare_optimizer(torch.optim.Adam(self.actor_params, lr=cfg.lr_actor))
        self.critic_opt: Any = acc.prepare_optimizer(torch.optim.Adam(self.critic_params, lr=cfg.lr_critic))
        self.alpha_opt: Any = None
        if self.auto_alpha:
            self.alpha_opt = acc.prepare_optimizer(torch.optim.Adam([self.log_alpha], lr=cfg.lr_alpha))
        # The processes as the accelerator sees them: each holds its own batch, gradients are averaged over them.
        self.dist = Dist(rank=acc.process_index, world=acc.num_processes)
        # accelerate's backward and clipping scale and unscale fp16 gradients; under fp16 an overflowing gradient
        # is routine (the grad scaler skips that step), so only the losses are checked there.
        self.optim = GradientStep("SAC", SAC_ADVICE, backward=acc.backward, clip_grad_norm=acc.clip_grad_norm_,
                                  autocast=acc.autocast, check_norms=acc.mixed_precision != "fp16")
        self.step = 0

    @property
    def alpha(self) -> torch.Tensor:
        """0-d current entropy temperature ``exp(log_alpha)`` (detached)."""
        return self.log_alpha.detach().exp()

    def _micro_batch(
        self, mb: Batch, warmup: bool, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Losses of one micro-batch; returns the total loss and its named 0-d terms (detached)."""
        cfg = self.cfg
        agent = self.agent
        with torch.no_grad():
            # Terminal transitions (zero discount: with HER often half the batch) need no bootstrap: not scored.
            nxt = agent(mb.next_prompt_ids, mb.next_prompt_mask, mb.next_cand_ids, mb.next_cand_mask, target=True,
                        rows=mb.discount > 0)
            next_v = soft_value(nxt.pi, nxt.log_pi, nxt.q.min(0).values, alpha)
            y = critic_target(mb.reward.to(next_v.dtype), mb.discount.to(next_v.dtype), next_v)
        action = mb.action.long()
        # q [n_q, B, K] without gradient (the actor's), q_taken [n_q, B] with it (the critic's): agent.forward.
        out = agent(mb.prompt_ids, mb.prompt_mask, mb.cand_ids, mb.cand_mask, action=action)
        q_taken = out.q_taken
        assert q_taken is not None  # given `action`, the online pass returns it
        critic = critic_loss(q_taken, y, huber=cfg.huber)
        entropy = -(out.pi * out.log_pi).sum(-1).detach()
        h_target = target_entropy(out.valid, cfg.target_entropy_ratio)
        terms: dict[str, torch.Tensor] = {
            "losses/critic": critic.loss.detach(),
            "charts/q_mean": q_taken.detach().mean(),
            "charts/y_mean": y.mean(),
            "charts/td_abs": critic.td_error.abs().mean(),
            "charts/entropy": entropy.mean(),
            "charts/target_entropy": h_target.mean(),
        }
        # Every term is computed (and logged) from the first update, so the logged keys never change; during the
        # critic warm-up only the critic loss is back-propagated.
        actor = actor_loss(out.pi, out.log_pi, out.q.min(0).values, alpha)
        terms["losses/actor"] = actor.loss.detach()
        policy_loss = actor.loss
        if cfg.hindsight_bc_coef > 0:
            log_pi_taken = out.log_pi.gather(-1, action.unsqueeze(-1)).squeeze(-1)
            bc = hindsight_bc_loss(
                log_pi_taken,
                mb.relabelled,
                mb.goal_gap,
                mb.goal_limit,
                within_limit=cfg.hindsight_bc_within_limit,
                discount=cfg.hindsight_bc_discount if cfg.hindsight_bc_discount > 0 else None,
            )
            policy_loss = policy_loss + cfg.hindsight_bc_coef * bc.loss
            terms["losses/hindsight_bc"] = bc.loss.detach()
            terms["charts/hindsight_fraction"] = bc.fraction
        temp = alpha_loss(self.log_alpha, entropy, h_target)
        terms["losses/alpha"] = temp.loss.detach()
        loss = critic.loss
        if not warmup:
            loss = loss + policy_loss
            if self.auto_alpha:
                loss = loss + temp.loss
        terms["losses/total"] = loss.detach()
        return loss, terms

    def update(self, batch: Batch) -> UpdateStats:
        """One SAC update (see the module docstring).

        Args:
            batch: a sampled :class:`~sacglam.types.Batch` of B transitions (moved to the accelerator's device);
                B must be divisible by ``cfg.grad_accum``.

        Returns:
            UpdateStats: 0-d tensors (means over micro-batches): ``losses/critic``, ``losses/actor``,
            ``losses/alpha``, ``losses/hindsight_bc``, ``losses/total``, ``charts/alpha``, ``charts/entropy``,
            ``charts/target_entropy``, ``charts/q_mean``, ``charts/y_mean``, ``charts/td_abs``,
            ``charts/hindsight_fraction``, ``charts/grad_norm_actor``, ``charts/grad_norm_critic``,
            ``charts/warmup`` (1 during the critic warm-up, when the actor, alpha and hindsight terms are computed
            and logged but not trained).

        Raises:
            NonFiniteLossError: a loss term or gradient norm is not finite (no optimizer step taken).
            ValueError: the batch size is not divisible by ``grad_accum``.
        """
        cfg = self.cfg
        batch = batch.to(self.device)
        size = len(batch)
        if size % cfg.grad_accum != 0:
            raise ValueError(
                f"SACUpdater.update: batch size {size} is not divisible by grad_accum={cfg.grad_accum}; "
                "choose a batch size that is a multiple of it."
            )
        micro = size // cfg.grad_accum
        warmup = self.step < cfg.critic_warmup_updates
        alpha = self.alpha
        micro_losses = [
            lambda i=i: self._micro_batch(batch.slice(i * micro, (i + 1) * micro), warmup, alpha)
            for i in range(cfg.grad_accum)
        ]
        # Critic, then actor and alpha (stepped after the critic warm-up); the actor's gradient norm is measured only
        # once it trains. The gradients are averaged over processes as one vector: actor, critic, log_alpha.
        groups = [
            ParamGroup(self.critic_params, self.critic_opt, cfg.grad_clip, "charts/grad_norm_critic"),
            ParamGroup(self.actor_params, self.actor_opt, cfg.grad_clip, "charts/grad_norm_actor", train=not warmup),
        ]
        if self.alpha_opt is not None:
            groups.append(ParamGroup([self.log_alpha], self.alpha_opt, train=not warmup))
        done = self.optim.run(self.step, micro_losses, groups, dist=self.dist,
                              reduce_params=[*self.actor_params, *self.critic_params, self.log_alpha],
                              context=lambda: f"batch: {_batch_stats(batch)}")
        if not warmup and self.alpha_opt is not None and cfg.alpha_min > 0:
            with torch.no_grad():
                self.log_alpha.clamp_(min=math.log(cfg.alpha_min))
        self.agent.update_target(cfg.tau)
        self.step += 1

        stats: UpdateStats = done.means()
        stats.update(done.norms)
        stats["charts/alpha"] = self.alpha
        stats["charts/warmup"] = torch.tensor(float(warmup), device=self.device)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Optimizer states, ``log_alpha`` and the update counter (the agent's weights are saved separately)."""
        return {
            "step": self.step,
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": None if self.alpha_opt is None else self.alpha_opt.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (for an exact resume, also restore the agent's weights).

        Raises:
            ValueError: if the alpha mode of the saved state differs from this updater's.
        """
        if (state["alpha_opt"] is None) == self.auto_alpha:
            raise ValueError(
                "SACUpdater.load_state_dict: the saved state was made with a different alpha_mode than "
                f"{self.cfg.alpha_mode!r}; use the same SACConfig.alpha_mode to resume."
            )
        self.step = int(state["step"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"].to(self.device))
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        if self.alpha_opt is not None:
            self.alpha_opt.load_state_dict(state["alpha_opt"])


class SACLearner:
    """The part of the loop that is SAC's, for ``train.py``: every vector step goes into the replay buffer (HER
    relabels at sampling time), and once the buffer holds ``learning_starts`` sampleable transitions,
    ``replay_ratio`` sampled transitions per env step are spent on updates (``replay_ratio * N / batch_size``
    updates per vector step, the fraction carried over).

    Args:
        agent: the :class:`~sacglam.agent.Agent`; cfg: :class:`SACConfig`.
        buffer: the replay buffer; encoder: text steps -> buffer transitions.
        codec: the prompt codec of the act function.
        batch_size, replay_ratio, learning_starts: the loop's replay options (``TrainConfig``).
        device: where the model runs; act_generator: samples actions; sample_generator: samples the buffer.
        relabeller: where achieved goals come from when it is not the env's oracle (``relabel.source=rule|llm``):
            the encoder then stores none, and each finished episode's goals are written into the buffer
            (``ReplayBuffer.set_achieved``) once the relabeller has judged it -- at once, before the step's updates,
            or a few steps later when it judges on a background thread (the episode is replayed under its own goal
            meanwhile).
        dist: this process's place in a data-parallel run (one process when None); with several, updates start
            only once every rank's buffer shard holds ``learning_starts`` sampleable transitions (its share).
    """

    def __init__(self, agent: Agent, cfg: SACConfig, buffer: ReplayBuffer, encoder: StepEncoder, codec: PromptCodec,
                 *, batch_size: int, replay_ratio: float, learning_starts: int, device: torch.device | str,
                 act_generator: torch.Generator, sample_generator: torch.Generator,
                 relabeller: OnlineRelabeller | None = None, dist: Dist | None = None) -> None:
        # cpu=True on CPU: without it accelerate sees one process under torchrun (sacglam/distributed.py)
        self.updater = SACUpdater(agent, cfg, Accelerator(cpu=torch.device(device).type == "cpu"))
        self.buffer, self.encoder = buffer, encoder
        self.batch_size, self.learning_starts = batch_size, learning_starts
        # Data-parallel: whether every rank's buffer shard is ready to update (their sampleable rows differ, and the
        # updates' gradient averaging needs all ranks in it); one process: its own verdict.
        self.dist = dist if dist is not None else Dist()
        self.updates_per_vector_step = replay_ratio * buffer.n_envs / batch_size
        self.update_credit = 0.0
        self.device = device
        self.act: ActFn = make_act_fn(agent, codec, greedy=False, device=device, generator=act_generator)
        self.generators = {"act": act_generator, "sample": sample_generator}
        self._batch: Batch | None = None  # the last sampled batch, overwritten by the next sample once used
        self.relabeller = relabeller
        if relabeller is not None and encoder.use_achieved:
            raise ValueError("with a relabeller the encoder must not store the env's achieved goals "
                             "(StepEncoder(..., use_achieved=False))")

    @property
    def updates(self) -> int:
        return self.updater.step

    def observe(self, step: TextStep, episodes: Sequence[EpisodeRecord] = ()) -> UpdateStats:
        """Store the vector step and run the updates it pays for; the last update's stats ({} when none ran).

        Args:
            step: the collector's vector step.
            episodes: the episodes that ended at this step (``EpisodeTracker.add``); only read with a relabeller.

        Raises:
            NonFiniteLossError: from :meth:`SACUpdater.update` (no optimizer step was taken).
        """
        starts = self.buffer.cur_start.tolist() if self.relabeller is not None and episodes else None
        self.buffer.add(self.encoder(step, policy_version=self.updates))
        if self.relabeller is not None:
            if starts is not None:
                end = self.buffer.pos  # the finished episodes' rows are [start, end) of their columns
                jobs = [RelabelJob(e.env_index, int(starts[e.env_index]), e) for e in episodes]
                ok = [j for j in jobs if end - j.start == j.episode.length]  # else it began before a resume
                self.relabeller.stats.counts["stale"] += len(jobs) - len(ok)
                self.relabeller.submit(ok)
            self._apply(self.relabeller.collect())
        stats: UpdateStats = {}
        if self._agree(self.buffer.num_sampleable >= self.learning_starts):
            self.update_credit += self.updates_per_vector_step
            while self.update_credit >= 1.0:
                self._batch = self.buffer.sample(self.batch_size, self.generators["sample"], out=self._batch)
                stats = self.updater.update(self._batch.to(self.device))
                self.update_credit -= 1.0
        return stats

    def _agree(self, ready: bool) -> bool:
        """Whether to update now: this process's verdict alone, or with several processes whether every one is ready
        (one collective: all ranks call it at every step)."""
        return ready if self.dist.world == 1 else all(self.dist.gather(ready))

    def _apply(self, done: list[tuple[RelabelJob, Relabelled]]) -> None:
        """Write judged episodes' achieved goals into the buffer (an episode the ring overwrote meanwhile is counted
        as stale; goals past ``buffer.max_achieved`` at a step as dropped)."""
        assert self.relabeller is not None
        counts = self.relabeller.stats.counts
        for job, res in done:
            ids, over = self.encoder.goal_rows(res.achieved)
            counts["dropped"] += over
            if not self.buffer.set_achieved(job.env, job.start, ids):
                counts["stale"] += 1

    def relabel_metrics(self, gather: Callable[[Any], list[Any]] | None = None) -> dict[str, float]:
        """``relabel/*`` (``RelabelStats.metrics``); {} without a relabeller. With ``gather`` (``Dist.gather``, a
        collective: every process must call it together), the counts of all processes pooled."""
        if self.relabeller is None:
            return {}
        if gather is None:
            return self.relabeller.stats.metrics()
        return type(self.relabeller.stats).merged(gather(self.relabeller.stats.state_dict())).metrics()

    def extra_metrics(self, gather: Callable[[Any], list[Any]]) -> dict[str, float]:
        """The loop's hook (:class:`sacglam.algos.base.Learner`): :meth:`relabel_metrics` pooled over the processes
        with ``gather`` ({} without a relabeller, and then no collective on any rank)."""
        return self.relabel_metrics(gather)

    def state_dict(self) -> dict[str, Any]:
        """The learner's state; with a background relabeller, first waits for the episodes it is judging and writes
        them into the buffer, so that the checkpoint holds them."""
        state = {"updater": self.updater.state_dict(), "buffer": self.buffer.state_dict(),
                 "encoder": self.encoder.state_dict(), "update_credit": self.update_credit}
        if self.relabeller is not None:
            self._apply(self.relabeller.collect(wait=True))
            state["relabel"] = self.relabeller.stats.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updater.load_state_dict(state["updater"])
        self.buffer.load_state_dict(state["buffer"])
        self.encoder.load_state_dict(state["encoder"])
        self.update_credit = float(state["update_credit"])
        if self.relabeller is not None and "relabel" in state:
            self.relabeller.stats.load_state_dict(state["relabel"])


__all__ = ["NonFiniteLossError", "SACConfig", "SACLearner", "SACUpdater"]
