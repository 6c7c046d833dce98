"""The agent: an LLM actor scoring candidate actions, twin Q heads on the same forward pass, and a Polyak target.

docs/design/ALGORITHM.md sections 1-2. One forward pass of the language model over ``[prompt, candidates]``
(``scoring.py``)
gives both the policy (candidate log-likelihoods, softmaxed over the candidate set) and, through small MLP heads on
each candidate's last hidden state, the critics ``Q_i(s, a)``.

Target network:
  * LoRA (a ``peft.PeftModel``): a second adapter named ``"target"`` (a copy of the adapter the critic reads) plus a
    copy of the heads. Only adapter and head weights are averaged, never the frozen base.
  * Full fine-tuning (a plain ``PreTrainedModel``): a deep copy of the trunk plus the heads; the calibration
    prototype found a Polyak copy of the trunk (not only of the heads) helped (docs/design/CALIBRATION.md).

Bootstrap state ``s'``: with a shared trunk the target pass yields both ``pi_targ(.|s')`` and ``Q_targ(s', .)``, so
a SAC update costs one forward on ``s`` with gradient and one target forward on ``s'``; the policy in ``V_targ`` is
thus the Polyak-lagged one (a deliberate saving of a third pass). With ``separate_adapter`` the actor has no target:
``pi(.|s')`` comes from the online actor adapter (no gradient) and ``Q_targ`` from the critic's target adapter.

Shape letters: B states, K candidate slots, Lp prompt tokens, Lc tokens per candidate, H hidden size, n_q critics.

The options (:class:`AgentConfig`) live in the light ``sacglam.config`` (the Hydra schema) and are re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sacglam.config import AgentConfig
from sacglam.losses import candidate_policy, choose_candidates
from sacglam.types import ActOutput

ScoreFn = Callable[..., Any]
"""``score_candidates(model, prompt_ids, prompt_mask, cand_ids, cand_mask, *, length_norm[, rows]) -> ScoreOutput``
(``rows`` is passed only by a target pass given ``rows``)."""

TARGET_ADAPTER = "target"
CRITIC_ADAPTER = "critic"
CRITIC_TARGET_ADAPTER = "critic_target"


@dataclass
class AgentOutput:
    """Policy and critics for B states.

    Attributes:
        log_pi: [B, K] log policy (0.0 on absent slots).
        pi: [B, K] policy (0.0 on absent slots).
        q: [n_q, B, K] critic values (0.0 on absent slots); detached when the pass was given the taken actions.
        valid: [B, K] bool, the candidate slot is present.
        q_taken: [n_q, B] ``Q_i(s, a)`` of the taken actions, with gradient, when the online pass was given them
            (0.0 where the taken slot is absent); None otherwise.
    """

    log_pi: torch.Tensor
    pi: torch.Tensor
    q: torch.Tensor
    valid: torch.Tensor
    q_taken: torch.Tensor | None = None


class QHeads(nn.Module):
    """``n_q`` independent MLP critics ``H -> hidden... -> 1`` with ReLU, applied to every candidate's hidden state."""

    def __init__(self, in_dim: int, hidden: Sequence[int], n_q: int) -> None:
        """Build the heads.

        Args:
            in_dim: hidden size H of the language model.
            hidden: hidden layer sizes of each MLP (e.g. [1024, 1024]; [] gives a linear head).
            n_q: number of critics (>= 1).
        """
        super().__init__()
        if n_q < 1:
            raise ValueError(f"AgentConfig.n_q must be >= 1, got {n_q}.")
        nets = []
        for _ in range(n_q):
            layers: list[nn.Module] = []
            width = in_dim
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, 1))
            nets.append(nn.Sequential(*layers))
        self.nets = nn.ModuleList(nets)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Q values of a flat set of candidates.

        Args:
            x: [N, H] candidate hidden states (any float dtype; cast to the heads' dtype).

        Returns:
            [n_q, N].
        """
        x = x.to(next(self.parameters()).dtype)
        return torch.stack([net(x).squeeze(-1) for net in self.nets])

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor, n_valid: int | None = None) -> torch.Tensor:
        """Q values of every candidate slot.

        With ``n_valid`` (the number of True entries of ``valid``, known from the scorer's one host sync) the MLPs
        run on the real slots only, gathered by ``torch.nonzero_static`` without a device sync, and the result is
        scattered back: on Playground about half of the K slots are padding. Without it every slot goes through the
        MLPs and the absent ones are masked afterwards (same values).

        Args:
            hidden: [B, K, H] candidate hidden states (any float dtype; cast to the heads' dtype).
            valid: [B, K] bool.
            n_valid: ``int(valid.sum())`` when known, else None.

        Returns:
            [n_q, B, K], 0.0 on absent slots.
        """
        b, k, h = hidden.shape
        flat = hidden.reshape(b * k, h)
        if n_valid is None:
            q = self.rows(flat).view(-1, b, k)
            return q.masked_fill(~valid.unsqueeze(0), 0.0)
        sel = torch.nonzero_static(valid.reshape(-1), size=n_valid).squeeze(1)  # [n_valid]; no host sync
        q_real = self.rows(flat.index_select(0, sel))  # [n_q, n_valid]
        return q_real.new_zeros(q_real.shape[0], b * k).index_copy(1, sel, q_real).view(-1, b, k)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but full fine-tuning needs nothing from it
        return False
    return isinstance(model, PeftModel)


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not isinstance(size, int):
        raise ValueError(
            f"Agent: cannot read the hidden size from {type(model).__name__}.config (no hidden_size or d_model); "
            "pass a transformers PreTrainedModel or a peft PeftModel wrapping one."
        )
    return size


def _swap_segment(name: str, old: str, new: str) -> str:
    return ".".join(new if part == old else part for part in name.split("."))


class Agent(nn.Module):
    """Actor + twin critics + target network over one language model (see the module docstring).

    Attributes:
        model: the (possibly peft-wrapped) language model; with LoRA it also holds the target adapter(s).
        heads: online :class:`QHeads`; target_heads: their Polyak copy (no gradient).
        target_model: deep copy of the trunk for full fine-tuning, else None.
    """

    def __init__(self, model: nn.Module, cfg: AgentConfig, *, scorer: ScoreFn | None = None) -> None:
        """Wrap ``model``: add the heads and build the target network.

        Args:
            model: a transformers causal/seq2seq LM, or a ``peft.PeftModel`` wrapping one (LoRA). For a peft model
                the trainable adapter is the active one; its ``requires_grad`` flags decide what trains.
            cfg: :class:`AgentConfig`.
            scorer: the candidate scorer; defaults to ``sacglam.scoring.score_candidates``.

        Raises:
            ValueError: on a bad option (e.g. ``separate_adapter`` without peft, non-positive temperature).
        """
        super().__init__()
        if cfg.temperature <= 0:
            raise ValueError(f"AgentConfig.temperature must be > 0, got {cfg.temperature}.")
        if scorer is None:
            from sacglam.scoring import score_candidates

            scorer = score_candidates
        self.cfg = cfg
        self._scorer = scorer
        self.model = model
        self.is_peft = _is_peft(model)
        self.heads = QHeads(_hidden_size(model), cfg.critic_hidden, cfg.n_q)
        self.target_heads = copy.deepcopy(self.heads).requires_grad_(False)
        self.target_model: nn.Module | None = None
        trunk_pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self.actor_adapter: str | None = None
        self.critic_adapter: str | None = None
        self.target_adapter: str | None = None
        if self.is_peft:
            trunk_pairs = self._build_lora_target(model, cfg.separate_adapter)
        else:
            if cfg.separate_adapter:
                raise ValueError(
                    "AgentConfig.separate_adapter=True needs a LoRA (peft) model; the given model is fully "
                    "fine-tuned. Use LoRA or set separate_adapter=False."
                )
            self.target_model = copy.deepcopy(model).requires_grad_(False)
            target_params = dict(self.target_model.named_parameters())
            trunk_pairs = [(p, target_params[n]) for n, p in model.named_parameters() if p.requires_grad]
        head_pairs = list(zip(self.heads.parameters(), self.target_heads.parameters(), strict=True))
        self._polyak_pairs = trunk_pairs + head_pairs
        # peft's set_adapter rewrites requires_grad (active adapter on, others off); snapshot the intended flags so
        # that switching adapters for a forward pass never changes what trains.
        self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]

    # ----------------------------------------------------------------------------------------------- construction
    def _build_lora_target(self, model: Any, separate: bool) -> list[tuple[nn.Parameter, nn.Parameter]]:
        actor = model.active_adapter
        if not isinstance(actor, str):
            raise ValueError(f"Agent: expected one active peft adapter, got {actor!r}; call model.set_adapter(name).")
        config = model.peft_config[actor]
        online_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        critic = actor
        if separate:
            critic = CRITIC_ADAPTER
            model.add_adapter(critic, config)
        model.add_adapter(TARGET_ADAPTER, config)
        params = dict(model.named_parameters())
        pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        flags: dict[str, bool] = {}  # the intended requires_grad of every parameter
        with torch.no_grad():
            for name, p in params.items():
                if name in online_flags:  # base weights and the actor adapter keep their flags (frozen base stays so)
                    flags.setdefault(name, online_flags[name])
                if actor not in name.split("."):
                    continue
                trainable = online_flags[name]
                source = p
                if separate:
                    critic_name = _swap_segment(name, actor, critic)
                    flags[critic_name] = trainable
                    source = params[critic_name]
                target_name = _swap_segment(name, actor, TARGET_ADAPTER)
                params[target_name].copy_(source)
                flags[target_name] = False
                if trainable:
                    pairs.append((source, params[target_name]))
        if not pairs:
            raise ValueError(f"Agent: the peft adapter {actor!r} has no trainable parameter to train or average.")
        model.set_adapter(actor)  # rewrites requires_grad, hence the flags applied after it
        unknown = [n for n in params if n not in flags]
        if unknown:
            raise ValueError(f"Agent: parameters {unknown[:3]} appeared with no known role; expected adapters only.")
        for name, p in params.items():
            p.requires_grad_(flags[name])
        self.actor_adapter, self.critic_adapter, self.target_adapter = actor, critic, TARGET_ADAPTER
        return pairs

    def _restore_grad_flags(self) -> None:
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)

    @contextmanager
    def _eval_mode(self, module: nn.Module) -> Iterator[None]:
        """Run the block with dropout off (target values and acting are estimates, not training noise)."""
        was_training = module.training
        module.eval()
        try:
            yield
        finally:
            module.train(was_training)

    @contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        """Run the block with peft adapter ``name`` active (no-op for full fine-tuning or the active one)."""
        if not self.is_peft or name is None or name == self.model.active_adapter:
            yield
            return
        model: Any = self.model
        model.set_adapter(name)
        self._restore_grad_flags()
        try:
            yield
        finally:
            model.set_adapter(self.actor_adapter)
            self._restore_grad_flags()

    # --------------------------------------------------------------------------------------------------- params
    def actor_parameters(self) -> list[nn.Parameter]:
        """Trainable trunk parameters read by the policy (LoRA actor adapter, or the whole trunk).

        With a shared trunk (no ``separate_adapter``) they also receive the critic loss's gradient.
        """
        if self.is_peft:
            assert self.actor_adapter is not None
            return [
                p for n, p in self.model.named_parameters() if p.requires_grad and self.actor_adapter in n.split(".")
            ]
        return [p for p in self.model.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters only the critic loss trains: the Q heads, plus the critic adapter with ``separate_adapter``."""
        params = list(self.heads.parameters())
        if self.is_peft and self.cfg.separate_adapter:
            params += [
                p for n, p in self.model.named_parameters() if p.requires_grad and CRITIC_ADAPTER in n.split(".")
            ]
        return params

    # -------------------------------------------------------------------------------------------------- forward
    def _score(
        self,
        adapter: str | None,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_mask: torch.Tensor,
        *,
        model: nn.Module | None = None,
        rows: torch.Tensor | None = None,
    ) -> Any:
        extra: dict[str, Any] = {} if rows is None else {"rows": rows}
        with self._adapter(adapter):
            return self._scorer(
                self.model if model is None else model,
                prompt_ids,
                prompt_mask,
                cand_ids,
                cand_mask,
                length_norm=self.cfg.length_norm,
                **extra,
            )

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_mask: torch.Tensor,
        *,
        target: bool = False,
        action: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> AgentOutput:
        """Policy and critics for B states.

        The critic heads run on the real candidate slots only when the scorer knows their count (``trim=True``, the
        default). Given the taken ``action`` (the SAC update's online pass), the pass splits the critic's work by what
        needs a gradient: ``q`` over all candidates is computed without one (the actor loss holds Q fixed), and
        ``q_taken`` with one on the B taken candidates only (the critic loss), so the heads' backward costs B rows,
        not ``B * K``. The gradients reaching the heads and the trunk are those of the full computation.

        Args:
            prompt_ids: [B, Lp] int64 or int32 (a replay batch's), right padded; prompt_mask: [B, Lp] bool.
            cand_ids: [B, K, Lc] int64 or int32, right padded; cand_mask: [B, K, Lc] bool (all False = absent slot).
            target: use the target network, always without gradient and without dropout (eval mode for the pass);
                see the module docstring for which policy. The online pass respects the module's train/eval mode.
            action: [B] long, the taken candidate of each state (online pass only): see above.
            rows: [B] bool, target pass only: the states to evaluate (the scorer runs on those only; the others get
                the output of a state with no candidate, whose soft value is 0). The SAC update passes
                ``discount > 0``: a terminal transition's bootstrap is multiplied by zero, and with HER more than
                half of a batch can be terminal.

        Returns:
            :class:`AgentOutput` with log_pi, pi [B, K], q [n_q, B, K], valid [B, K], and q_taken [n_q, B] when
            ``action`` was given.
        """
        args = (prompt_ids, prompt_mask, cand_ids, cand_mask)
        if not target:
            if rows is not None:
                raise ValueError("Agent.forward: `rows` is for the target pass (target=True) only.")
            out = self._score(self.actor_adapter, *args)
            log_pi, pi = candidate_policy(out.logp, out.valid, self.cfg.temperature)
            critic_out = self._score(self.critic_adapter, *args) if self.cfg.separate_adapter else out
            if action is None:
                q = self.heads(critic_out.hidden, out.valid, critic_out.n_valid)
                return AgentOutput(log_pi=log_pi, pi=pi, q=q, valid=out.valid)
            q, q_taken = self._online_q(critic_out.hidden, out.valid, critic_out.n_valid, action)
            return AgentOutput(log_pi=log_pi, pi=pi, q=q, valid=out.valid, q_taken=q_taken)
        if action is not None:
            raise ValueError("Agent.forward: `action` is for the online pass (target=False) only.")
        with torch.no_grad(), self._eval_mode(self.model if self.target_model is None else self.target_model):
            if self.cfg.separate_adapter:
                out = self._score(self.actor_adapter, *args, rows=rows)
                critic_out = self._score(self.target_adapter, *args, rows=rows)
            else:
                out = critic_out = self._score(self.target_adapter, *args, model=self.target_model, rows=rows)
            log_pi, pi = candidate_policy(out.logp, out.valid, self.cfg.temperature)
            q = self.target_heads(critic_out.hidden, out.valid, critic_out.n_valid)
            return AgentOutput(log_pi=log_pi, pi=pi, q=q, valid=out.valid)

    def _online_q(
        self, hidden: torch.Tensor, valid: torch.Tensor, n_valid: int | None, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` [n_q, B, K] without gradient and ``q_taken`` [n_q, B] with it (see :meth:`forward`).

        Args:
            hidden: [B, K, H] candidate hidden states (with gradient); valid: [B, K] bool; action: [B] long.
        """
        b, _, h = hidden.shape
        idx = action.long().view(b, 1)
        with torch.no_grad():
            q = self.heads(hidden.detach(), valid, n_valid)
        taken = hidden.gather(1, idx.unsqueeze(-1).expand(b, 1, h)).squeeze(1)  # [B, H]
        q_taken = self.heads.rows(taken)  # [n_q, B]
        return q, q_taken.masked_fill(~valid.gather(1, idx).view(1, b), 0.0)

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
        """Choose one candidate per state with the online policy (no critic pass, dropout off).

        Args:
            prompt_ids, prompt_mask, cand_ids, cand_mask: as in :meth:`forward` (N states).
            greedy: take the argmax of pi; else sample from pi.
            generator: random generator for sampling (its device may differ from the model's).

        Returns:
            ActOutput(action [N] long, logp [N] float: log pi of the chosen action), on CPU.

        Raises:
            ValueError: if a state has no candidate.
        """
        with self._eval_mode(self.model):
            out = self._score(self.actor_adapter, prompt_ids, prompt_mask, cand_ids, cand_mask)
        log_pi, pi = candidate_policy(out.logp, out.valid, self.cfg.temperature)
        action, logp = choose_candidates(log_pi, pi, out.valid, greedy=greedy, generator=generator, who="Agent.act")
        return ActOutput(action=action.cpu(), logp=logp.float().cpu())

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """Polyak update ``target <- (1 - tau) target + tau online`` of the trainable weights and the heads.

        Args:
            tau: averaging weight in [0, 1] (1 copies the online weights).
        """
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"Agent.update_target: tau must be in [0, 1], got {tau}.")
        online: list[torch.Tensor] = [p for p, _ in self._polyak_pairs]
        target: list[torch.Tensor] = [t for _, t in self._polyak_pairs]
        torch._foreach_lerp_(target, online, tau)


__all__ = ["Agent", "AgentConfig", "AgentOutput", "QHeads"]
