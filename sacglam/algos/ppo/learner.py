"""PPO-GLAM over candidate sets: the on-policy baseline in the same harness (docs/design/ALGORITHM.md section 7).

The policy is the one SAC trains: ``pi(a|s) = softmax over A(s) of score(a|s) / temperature`` with
``score = sum_t log_softmax`` over the candidate's tokens (``sacglam.scoring``, ``losses.candidate_policy``), on the
same model (LoRA or full fine-tuning). A value head ``V(s)`` reads the state's own hidden state
(``ScoreOutput.prompt_hidden``: the prompt's last token for decoder-only models, the decoder start position for T5)
from the **same forward pass** that scores the candidates, so a state costs one pass, not one per candidate.

One PPO iteration (:class:`PPOLearner`):

1. act ``rollout_steps`` vector steps with the sampled policy; :class:`RolloutStorage` keeps the token ids the policy
   saw (no re-tokenisation), the behaviour log-probs and the values recorded at acting time;
2. bootstrap values: ``V(final observation)`` where an episode was truncated (time limit), ``V(s_T)`` after the last
   step; a termination bootstraps nothing;
3. :func:`compute_gae` (returns = advantages + values), advantages normalised once over the whole rollout;
4. ``epochs x minibatches`` of the clipped surrogate, the clipped value loss and the entropy bonus, each minibatch
   optionally split into ``grad_accum`` equal micro-batches (the accumulated gradient equals the minibatch's, since
   normalisation is per rollout and every micro-batch loss is divided by their count), one global gradient-norm clip
   over a parameter *list* (the published code handed a consumed generator to the clip, which then clipped nothing)
   and a finiteness check: the shared optimizer step, :class:`sacglam.algos.optim.GradientStep`.

Shape letters: T rollout steps, N envs, B states, K candidate slots, Lp prompt tokens, Lc tokens per candidate,
H hidden size.

The options (:class:`PPOConfig`) and :func:`check_on_policy` live in the light ``sacglam.algos.ppo.config`` (the Hydra
schema imports them without torch) and are re-exported here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sacglam.agent import _hidden_size
from sacglam.algos.optim import GradientStep, ParamGroup, StepResult
from sacglam.algos.ppo.config import REPLAY_ONLY, PPOConfig, check_on_policy
from sacglam.distributed import Dist
from sacglam.losses import candidate_policy, choose_candidates
from sacglam.prompting import PromptCodec
from sacglam.types import ActOutput, TextStep, UpdateStats
from sacglam.validate import ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# the maths (tensors in, tensors out)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout with auto-reset envs.

    ``delta_t = r_t + gamma * V_next(t) - V(s_t)``, ``A_t = delta_t + gamma * lam * c_t * A_{t+1}``, where
    ``V_next(t)`` is ``V(s_{t+1})`` while the episode goes on, ``bootstrap[t]`` (``V`` of the final observation)
    where it was truncated at ``t`` or at the rollout's last step, and 0 where it terminated; ``c_t = 0`` where
    the episode ended at ``t`` (the next row belongs to a new episode). A termination wins over a truncation.

    Args:
        rewards, values: [T, N] float.
        terminated, truncated: [T, N] bool.
        bootstrap: [T, N] float; read only where ``truncated`` (and not terminated), and at ``t = T - 1``.
        gamma, lam: discount and GAE lambda.

    Returns:
        advantages [T, N] and returns = advantages + values [T, N].
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[0])
    ended = terminated | truncated
    for t in reversed(range(T)):
        next_v = bootstrap[t] if t == T - 1 else torch.where(truncated[t], bootstrap[t], values[t + 1])
        next_v = torch.where(terminated[t], torch.zeros_like(next_v), next_v)
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * (~ended[t]).to(values.dtype) * last
        adv[t] = last
    return adv, adv + values


@dataclass
class PolicyLoss:
    """The clipped surrogate of B transitions: loss (0-d), ratio [B], clip_fraction and approx_kl (0-d, detached)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
) -> PolicyLoss:
    """``mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(logp - old_logp)``.

    Args:
        logp: [B] log pi(a|s) under the current weights (with gradient).
        old_logp: [B] behaviour log-probs recorded at acting time.
        advantages: [B] (already normalised if asked).
        clip: epsilon.

    Returns:
        :class:`PolicyLoss`; ``approx_kl`` is the low-variance estimator ``mean((r - 1) - log r)``.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip).float().mean()
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
    return PolicyLoss(loss=loss, ratio=ratio.detach(), clip_fraction=clip_fraction, approx_kl=approx_kl)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> torch.Tensor:
    """``mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``; plain ``mean((V - R)^2)`` when ``clip`` is 0.

    Args:
        values: [B] current V(s) (with gradient); old_values: [B] recorded at acting time; returns: [B].
    """
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return unclipped.mean()
    clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
    return torch.maximum(unclipped, clipped).mean()


def candidate_entropy(pi: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Entropy of each state's candidate distribution. pi, log_pi: [B, K] (0 on absent slots) -> [B]."""
    return -(pi * log_pi).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# the model: policy + value head on one pass


class ValueHead(nn.Module):
    """MLP ``H -> hidden... -> 1`` on the state's hidden state (GLAM: 1024, 1024 with sigmoid activations)."""

    ACTIVATIONS: ClassVar[dict[str, Callable[[], nn.Module]]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU,
                                                                 "tanh": nn.Tanh}

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"algo.value_activation={activation!r}: choose one of {sorted(self.ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), self.ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] (any float dtype) -> values [B] in the head's dtype."""
        return self.net(hidden.to(next(self.parameters()).dtype)).squeeze(-1)


@dataclass
class PolicyValue:
    """log_pi, pi: [B, K] (0 on absent slots); valid: [B, K] bool; value: [B]."""

    log_pi: torch.Tensor
    pi: torch.Tensor
    valid: torch.Tensor
    value: torch.Tensor


class PPOAgent(nn.Module):
    """The candidate-set policy and a value head over one language model (LoRA or fully fine-tuned).

    ``act`` has the signature of :meth:`sacglam.agent.Agent.act`, so ``pipeline.make_act_fn`` and evaluation work
    unchanged; it also returns ``V(s)`` in ``ActOutput.value``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: PPOConfig,
        *,
        temperature: float = 1.0,
        length_norm: bool = False,
        scorer: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"agent.temperature must be > 0, got {temperature}.")
        if scorer is None:
            from sacglam.scoring import score_candidates

            scorer = score_candidates
        self.model = model
        self.value_head = ValueHead(_hidden_size(model), cfg.value_hidden, cfg.value_activation)
        self.temperature = temperature
        self.length_norm = length_norm
        self._scorer = scorer

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything PPO trains: the trainable trunk weights (LoRA adapter or all) and the value head."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor
    ) -> PolicyValue:
        """Policy and value of B states from one scoring pass.

        Args:
            prompt_ids: [B, Lp] long, right padded; prompt_mask: [B, Lp] bool.
            cand_ids: [B, K, Lc] long; cand_mask: [B, K, Lc] bool (all False = absent slot).
        """
        out = self._scorer(self.model, prompt_ids, prompt_mask, cand_ids, cand_mask, length_norm=self.length_norm)
        log_pi, pi = candidate_policy(out.logp, out.valid, self.temperature)
        return PolicyValue(log_pi=log_pi, pi=pi, valid=out.valid, value=self.value_head(out.prompt_hidden))

    @contextmanager
    def _eval_mode(self) -> Any:
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @torch.inference_mode()
    def act(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_mask: torch.Tensor,
        *,
        greedy: bool,
        generator: torch.Generator | None = None,
    ) -> ActOutput:
        """Choose one candidate per state (dropout off). Returns action [N], logp [N], value [N] on the CPU.

        Raises:
            ValueError: if a state has no candidate.
        """
        with self._eval_mode():
            out = self(prompt_ids, prompt_mask, cand_ids, cand_mask)
        action, logp = choose_candidates(out.log_pi, out.pi, out.valid, greedy=greedy, generator=generator,
                                         who="PPOAgent.act")
        return ActOutput(action=action.cpu(), logp=logp.float().cpu(), value=out.value.float().cpu())


# ---------------------------------------------------------------------------------------------------------------------
# rollouts


class RolloutStorage:
    """``T x N`` on-policy transitions as token ids (what the policy saw), on the CPU until an update moves them.

    Attributes (all [T, N, ...]): prompt_ids [Lp] long, prompt_mask [Lp] bool, cand_ids [K, Lc] long,
    cand_mask [K, Lc] bool, action, logp, value, reward, terminated, truncated, bootstrap; ``pos`` rows are filled.
    """

    FIELDS = ("prompt_ids", "prompt_mask", "cand_ids", "cand_mask", "action", "logp", "value", "reward",
              "terminated", "truncated", "bootstrap")

    def __init__(self, steps: int, num_envs: int, prompt_width: int, max_cands: int, max_cand_tokens: int) -> None:
        T, N = steps, num_envs
        self.steps, self.num_envs = T, N
        self.prompt_ids = torch.zeros(T, N, prompt_width, dtype=torch.long)
        self.prompt_mask = torch.zeros(T, N, prompt_width, dtype=torch.bool)
        self.cand_ids = torch.zeros(T, N, max_cands, max_cand_tokens, dtype=torch.long)
        self.cand_mask = torch.zeros(T, N, max_cands, max_cand_tokens, dtype=torch.bool)
        self.action = torch.zeros(T, N, dtype=torch.long)
        self.logp = torch.zeros(T, N)
        self.value = torch.zeros(T, N)
        self.reward = torch.zeros(T, N)
        self.terminated = torch.zeros(T, N, dtype=torch.bool)
        self.truncated = torch.zeros(T, N, dtype=torch.bool)
        self.bootstrap = torch.zeros(T, N)
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos == self.steps

    def add(self, **row: torch.Tensor) -> None:
        """Write one vector step (every field of :attr:`FIELDS` but ``bootstrap``, each [N, ...])."""
        if self.full:
            raise RuntimeError("RolloutStorage.add: the rollout is full; update and clear() first")
        for name, value in row.items():
            getattr(self, name)[self.pos].copy_(value)
        self.bootstrap[self.pos].zero_()
        self.pos += 1

    def clear(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, **{f: getattr(self, f).clone() for f in self.FIELDS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.FIELDS:
            if getattr(self, f).shape != state[f].shape:
                raise ValueError(f"RolloutStorage: saved {f} has shape {tuple(state[f].shape)}, this run "
                                 f"{tuple(getattr(self, f).shape)}; resume with the same num_envs, rollout_steps "
                                 "and buffer token limits")
            getattr(self, f).copy_(state[f])
        self.pos = int(state["pos"])


class RolloutActor:
    """The collector's ``ActFn`` for PPO: encodes the text with the codec, samples from the policy, and keeps what it
    encoded and recorded (:attr:`last`) so that the rollout stores exactly the token ids the policy acted on."""

    def __init__(self, agent: PPOAgent, codec: PromptCodec, device: torch.device | str,
                 generator: torch.Generator | None) -> None:
        self.agent, self.codec, self.device, self.generator = agent, codec, device, generator
        self.last: dict[str, torch.Tensor] | None = None

    def __call__(self, goals: Sequence[str], observations: Sequence[str],
                 candidates: Sequence[Sequence[str]]) -> ActOutput:
        prompt_ids, prompt_mask = self.codec.encode_prompts(goals, observations, candidates)
        cand_ids, cand_mask = self.codec.candidate_tensors(candidates)
        d = self.device
        out = self.agent.act(prompt_ids.to(d), prompt_mask.to(d), cand_ids.to(d), cand_mask.to(d), greedy=False,
                             generator=self.generator)
        assert out.value is not None
        self.last = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "cand_ids": cand_ids,
                     "cand_mask": cand_mask, "action": out.action, "logp": out.logp, "value": out.value}
        return out

    @torch.inference_mode()
    def values(self, goals: Sequence[str], observations: Sequence[str],
               candidates: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """V(s) of N states [N] on the CPU. The value reads the prompt only (which lists ``candidates`` when the prompt
        lists actions), so one placeholder candidate stands in for the (possibly empty) candidate list of a final
        observation."""
        prompt_ids, prompt_mask = self.codec.encode_prompts(goals, observations, candidates)
        n = len(goals)
        cand_ids = torch.full((n, 1, 1), self.codec.pad_id, dtype=torch.long)
        cand_mask = torch.ones(n, 1, 1, dtype=torch.bool)
        d = self.device
        with self.agent._eval_mode():
            out = self.agent(prompt_ids.to(d), prompt_mask.to(d), cand_ids.to(d), cand_mask.to(d))
        return out.value.float().cpu()


# ---------------------------------------------------------------------------------------------------------------------
# the update

# The end of NonFiniteLossError's "Fix:" sentence.
PPO_ADVICE = "check the rewards for NaN/inf (and algo.reward_scale), lower algo.lr, or set algo.max_grad_norm > 0"


class PPOUpdater:
    """Owns the optimizer; one :meth:`update` per full rollout (epochs x minibatches x micro-batches)."""

    def __init__(self, agent: PPOAgent, cfg: PPOConfig, *, batch_size: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None, dist: Dist | None = None) -> None:
        """Check the options against the rollout size and build Adam.

        Args:
            agent: the :class:`PPOAgent`.
            cfg: :class:`PPOConfig`.
            batch_size: transitions per rollout (``env.num_envs x algo.rollout_steps``).
            device: where the update runs.
            generator: draws the minibatch permutations (CPU).
            dist: this process's place in a data-parallel run (one process when None).

        The options' domains, and that ``grad_accum`` divides ``minibatch_size``, were checked when ``cfg`` was
        built (``PPO_DOMAINS``); this process's share of the rollout is checked here.

        Raises:
            ConfigError: the minibatch does not divide the rollout (naming ``algo.minibatch_size``).
            ValueError: an agent with nothing to train.
        """
        if cfg.minibatch_size < 1 or batch_size % cfg.minibatch_size != 0:  # (its share with several processes)
            raise ConfigError(
                f"algo.minibatch_size={cfg.minibatch_size} does not divide the rollout of env.num_envs x "
                f"algo.rollout_steps = {batch_size} transitions; choose a divisor of {batch_size}"
            )
        self.cfg, self.agent, self.device = cfg, agent, torch.device(device)
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator()
        self.params = agent.trainable_parameters()
        if not self.params:
            raise ValueError("PPOUpdater: the agent has no trainable parameter (all frozen?); unfreeze LoRA.")
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, eps=cfg.adam_eps)
        self.step = 0  # completed updates (rollouts)
        # Data-parallel (``dist.world`` > 1): each process updates on its own rollout with minibatches of its share;
        # gradients, the advantage normalisation, the target-KL test and the returned stats are means over all.
        self.dist = dist if dist is not None else Dist()
        self.optim = GradientStep("PPO", PPO_ADVICE)

    def _loss(self, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and detached terms of one micro-batch (a dict of [b, ...] tensors on the device)."""
        cfg = self.cfg
        out = self.agent(data["prompt_ids"], data["prompt_mask"], data["cand_ids"], data["cand_mask"])
        logp = out.log_pi.gather(-1, data["action"].unsqueeze(-1)).squeeze(-1)
        pol = clipped_policy_loss(logp, data["logp"], data["advantages"], cfg.clip_coef)
        value = out.value.float()
        v_loss = clipped_value_loss(value, data["value"], data["returns"], cfg.clip_value)
        entropy = candidate_entropy(out.pi, out.log_pi).mean()
        loss = pol.loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
        terms = {"losses/policy": pol.loss.detach(), "losses/value": v_loss.detach(), "charts/entropy":
                 entropy.detach(), "losses/total": loss.detach(), "losses/approx_kl": pol.approx_kl,
                 "charts/clip_fraction": pol.clip_fraction, "charts/value_mean": value.detach().mean(),
                 "ratio_dev": (pol.ratio - 1.0).abs().max()}
        return loss, terms

    def update(self, flat: dict[str, torch.Tensor]) -> UpdateStats:
        """PPO epochs over one rollout.

        Args:
            flat: [M] / [M, ...] CPU tensors of the M transitions (:meth:`PPOLearner.flatten`): prompt_ids,
                prompt_mask, cand_ids, cand_mask, action, logp, value, advantages, returns.

        Returns:
            Means over minibatches: ``losses/policy``, ``losses/value``, ``losses/total``, ``losses/approx_kl``,
            ``charts/entropy``, ``charts/clip_fraction``, ``charts/value_mean``, ``charts/grad_norm`` (before
            clipping), plus ``charts/first_ratio_dev`` (max |ratio - 1| in the first minibatch: 0 up to float
            error when acting and training score alike), ``charts/explained_variance``, ``charts/epochs``.

        Raises:
            sacglam.algos.optim.NonFiniteLossError: a loss or gradient norm is NaN/inf (no optimizer step taken for
                that minibatch).
        """
        cfg = self.cfg
        M = flat["action"].shape[0]
        if self.batch_size != M:
            raise ValueError(f"PPOUpdater.update: got {M} transitions, expected {self.batch_size}")
        adv = flat["advantages"]
        if cfg.norm_adv:
            mean, std = self._adv_moments(adv)
            adv = (adv - mean) / (std + 1e-8)
        data = {**flat, "advantages": adv}
        grouped: dict[str, list[torch.Tensor]] = defaultdict(list)
        first_dev: torch.Tensor | None = None
        epochs_done = 0
        for epoch in range(cfg.epochs):
            perm = torch.randperm(M, generator=self.generator)
            epoch_kl: list[torch.Tensor] = []
            for start in range(0, M, cfg.minibatch_size):
                done = self._minibatch(data, perm[start : start + cfg.minibatch_size],
                                       f"rollout of {M} transitions, epoch {epoch}, minibatch "
                                       f"{start // cfg.minibatch_size}")
                per_micro, norm = done.terms, done.norms["charts/grad_norm"]
                if first_dev is None:
                    first_dev = torch.stack([t["ratio_dev"] for t in per_micro]).max()
                for terms in per_micro:
                    for k, v in terms.items():
                        if k != "ratio_dev":
                            grouped[k].append(v.float())
                grouped["charts/grad_norm"].append(norm.float())
                epoch_kl += [t["losses/approx_kl"] for t in per_micro]
            epochs_done += 1
            if cfg.target_kl > 0:
                kl = torch.stack(epoch_kl).mean()
                if float(self.dist.mean(kl)) > cfg.target_kl:
                    break  # every process sees the same mean, so all stop after the same epoch
        self.step += 1
        stats: UpdateStats = {k: torch.stack(v).mean() for k, v in grouped.items()}
        assert first_dev is not None
        stats["charts/first_ratio_dev"] = first_dev
        ret, val = flat["returns"], flat["value"]
        stats["charts/explained_variance"] = 1.0 - (ret - val).var() / ret.var().clamp(min=1e-8)
        stats["charts/return_mean"] = ret.mean()
        stats["charts/epochs"] = torch.tensor(float(epochs_done))
        if self.dist.world > 1:  # means over the processes (explained variance: the mean of theirs)
            names = sorted(stats)
            together = self.dist.mean(torch.stack([stats[k].float().to(self.device) for k in names]))
            stats = dict(zip(names, together.unbind(0), strict=True))
        return stats

    def _minibatch(self, data: dict[str, torch.Tensor], idx: torch.Tensor, where: str) -> StepResult:
        """One optimizer step on the minibatch ``idx`` [m] of ``data``'s rows, as ``grad_accum`` equal micro-batches
        (moved to the device one at a time); gradients averaged over the processes, one global norm clip.

        Raises:
            NonFiniteLossError: a loss term or the gradient norm is NaN/inf (no optimizer step taken).
        """
        micro = self.cfg.minibatch_size // self.cfg.grad_accum

        def micro_loss(j: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            sub = idx[j * micro : (j + 1) * micro]
            return self._loss({k: v[sub].to(self.device, non_blocking=True) for k, v in data.items()})

        losses = [lambda j=j: micro_loss(j) for j in range(self.cfg.grad_accum)]
        group = ParamGroup(self.params, self.opt, self.cfg.max_grad_norm, "charts/grad_norm")
        return self.optim.run(self.step, losses, [group], dist=self.dist, context=lambda: where)

    def _adv_moments(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (Bessel-corrected) std of the advantages [M]: this rollout's, or with several processes those of
        all their rollouts together (of equal sizes)."""
        if self.dist.world == 1:
            return adv.mean(), adv.std()
        m, n = adv.shape[0], adv.shape[0] * self.dist.world
        mean_sum, mean_sq = self.dist.mean(torch.stack([adv.sum(), (adv * adv).sum()]).to(self.device)).cpu()
        mean = mean_sum / m  # the sum over processes is world x the mean of the sums, over n = world x m values
        var = (mean_sq / m - mean * mean).clamp(min=0.0) * n / max(n - 1, 1)
        return mean, var.sqrt()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.opt.load_state_dict(state["opt"])


# ---------------------------------------------------------------------------------------------------------------------
# the part of the loop that is PPO's


class PPOLearner:
    """On-policy rollouts and updates for ``train.py``: act, store, bootstrap, GAE, update, clear.

    Args:
        agent: the :class:`PPOAgent`.
        cfg: :class:`PPOConfig`.
        codec: the prompt codec (the same one evaluation uses).
        num_envs: N.
        device: where the model runs.
        act_generator: samples actions; shuffle_generator: draws minibatch permutations (both checkpointed).
        dist: this process's place in a data-parallel run (one process when None); ``cfg.minibatch_size`` is then
            this process's share of every minibatch.
    """

    def __init__(self, agent: PPOAgent, cfg: PPOConfig, codec: PromptCodec, num_envs: int,
                 device: torch.device | str, act_generator: torch.Generator,
                 shuffle_generator: torch.Generator, dist: Dist | None = None) -> None:
        self.cfg = cfg
        self.actor = RolloutActor(agent, codec, device, act_generator)
        self.storage = RolloutStorage(cfg.rollout_steps, num_envs, codec.prompt_width, codec.max_cands,
                                      codec.max_cand_tokens)
        self.updater = PPOUpdater(agent, cfg, batch_size=num_envs * cfg.rollout_steps, device=device,
                                  generator=shuffle_generator, dist=dist)
        self.generators = {"act": act_generator, "shuffle": shuffle_generator}

    @property
    def act(self) -> RolloutActor:
        """The collector's act function."""
        return self.actor

    @property
    def updates(self) -> int:
        return self.updater.step

    def observe(self, step: TextStep, episodes: Sequence[Any] = ()) -> UpdateStats:
        """Store the vector step the collector just took (with the tensors the actor encoded for it); when the
        rollout is full, bootstrap, compute GAE and update. Returns the update's stats, or {} when none ran.
        ``episodes`` (the finished episodes' text) is accepted for the loop's sake: PPO relabels nothing."""
        last = self.actor.last
        if last is None:
            raise RuntimeError("PPOLearner.observe: the collector did not act through PPOLearner.act")
        self.actor.last = None
        st = self.storage
        t = st.pos
        terminated = torch.tensor(step.terminated, dtype=torch.bool)
        truncated = torch.tensor(step.truncated, dtype=torch.bool)
        reward = torch.tensor(step.rewards, dtype=torch.float32) * self.cfg.reward_scale
        st.add(**last, reward=reward, terminated=terminated, truncated=truncated)
        # Bootstrap V(final observation) through truncations, and V(s_T) after the rollout's last step.
        need = truncated & ~terminated
        if st.full:
            need = ~terminated
        rows = need.nonzero().flatten().tolist()
        if rows:
            v = self.actor.values([step.goals[i] for i in rows], [step.next_observations[i] for i in rows],
                                  [step.next_candidates[i] for i in rows])
            st.bootstrap[t, rows] = v
        if not st.full:
            return {}
        stats = self.updater.update(self.flatten())
        st.clear()
        return stats

    def extra_metrics(self, gather: Callable[[Any], list[Any]]) -> dict[str, float]:
        """The loop's hook (:class:`sacglam.algos.base.Learner`): PPO has no metrics beyond its update stats ({}, and
        no collective)."""
        return {}

    def flatten(self) -> dict[str, torch.Tensor]:
        """The full rollout as [T * N, ...] tensors with advantages and returns (GAE)."""
        st = self.storage
        adv, ret = compute_gae(st.reward, st.value, st.terminated, st.truncated, st.bootstrap, self.cfg.gamma,
                               self.cfg.gae_lambda)
        out = {k: getattr(st, k).flatten(0, 1) for k in ("prompt_ids", "prompt_mask", "cand_ids", "cand_mask",
                                                          "action", "logp", "value")}
        out["advantages"] = adv.flatten()
        out["returns"] = ret.flatten()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"updater": self.updater.state_dict(), "storage": self.storage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updater.load_state_dict(state["updater"])
        self.storage.load_state_dict(state["storage"])


__all__ = [
    "REPLAY_ONLY",
    "PPOAgent",
    "PPOConfig",
    "PPOLearner",
    "PPOUpdater",
    "PolicyLoss",
    "RolloutActor",
    "RolloutStorage",
    "ValueHead",
    "candidate_entropy",
    "check_on_policy",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_gae",
]
