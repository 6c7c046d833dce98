"""One optimizer step for SAC, PPO and ETO: accumulate, average over processes, clip, check, step.

:class:`GradientStep` runs the gradient part of an update the same way for every algorithm:

1. zero the gradients of every parameter group;
2. gradient accumulation: for each of the k micro-batches, compute its loss and back-propagate ``loss / k`` (equal
   micro-batches whose losses are means make the accumulated gradient that of the whole batch's mean);
3. with several processes (``Dist.world > 1``), replace every gradient by its mean over the processes, in one
   all-reduce (``sacglam.distributed.average_gradients``);
4. per parameter group, measure the global gradient norm and clip it to the group's ``max_norm`` (0 = measure only);
5. one finiteness check (one host sync) of every loss term and gradient norm: on a NaN/inf, raise
   :class:`NonFiniteLossError` naming the algorithm, the update and the first offending term, before any optimizer
   step, so the weights and the optimizer states are untouched;
6. step the optimizers of the trained groups, in group order.

What is algorithm-specific is supplied by the caller: the micro-batch losses (closures), the groups and their max
norms, the backward and clipping functions (accelerate's for SAC, which also handle mixed precision), and the advice
the error gives. Nothing here draws random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from sacglam.distributed import Dist, average_gradients

# A micro-batch's loss: () -> (0-d loss with gradient, its named 0-d terms, detached).
MicroLoss = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
TOTAL = "losses/total"  # the name under which a micro-batch's loss itself is checked


class NonFiniteLossError(FloatingPointError):
    """A loss term or gradient norm was NaN/inf; raised before any optimizer step, so the weights are untouched.

    Attributes:
        algo: the algorithm's name as printed (``"SAC"``, ``"PPO"``, ``"ETO"``).
        step: index of the update (0-based: the updater's counter before the update).
        term: the first offending term, e.g. ``"losses/critic"`` or ``"charts/grad_norm_actor"``.
        micro_batch: index of the micro-batch holding ``term`` (None for a gradient norm or the total).
    """

    def __init__(self, algo: str, step: int, term: str, micro_batch: int | None, context: str, advice: str) -> None:
        """Build the message ``non-finite <term> at <algo> update <step> (micro-batch i); <context>. ...``.

        Args:
            algo: the algorithm's name as printed.
            step: index of the update.
            term: the first offending term.
            micro_batch: index of its micro-batch, or None.
            context: a short description of the data, e.g. ``"batch: size 8, reward min ..."`` ("" = none).
            advice: what the user can change, e.g. ``"lower the learning rates or alpha_init"``.
        """
        where = f" (micro-batch {micro_batch})" if micro_batch is not None else ""
        where += f"; {context}" if context else ""
        super().__init__(
            f"non-finite {term} at {algo} update {step}{where}. No optimizer step was taken. "
            f"Fix: {advice}; resume from the last checkpoint."
        )
        self.algo = algo
        self.step = step
        self.term = term
        self.micro_batch = micro_batch


@dataclass
class ParamGroup:
    """Parameters stepped by one optimizer and clipped together.

    Attributes:
        params: the group's parameters (a list, not a generator: it is read several times).
        optimizer: a ``torch.optim.Optimizer`` (or accelerate's wrapper of one).
        max_norm: clip the group's global gradient norm to this; 0 = measure the norm without clipping.
        norm_key: the metric name of the group's gradient norm (before clipping); None = neither measured nor
            clipped (e.g. SAC's ``log_alpha``).
        train: False = the group's gradients are zeroed (and averaged over processes) but it is neither clipped,
            measured nor stepped (SAC's actor during the critic warm-up).
    """

    params: Sequence[torch.Tensor]
    optimizer: Any
    max_norm: float = 0.0
    norm_key: str | None = None
    train: bool = True


@dataclass
class StepResult:
    """What one :meth:`GradientStep.run` measured.

    Attributes:
        terms: per micro-batch, its named 0-d terms (detached), in micro-batch order.
        norms: per measured group, its 0-d float gradient norm before clipping, in group order.
    """

    terms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def means(self) -> dict[str, torch.Tensor]:
        """Each term's mean over the micro-batches (0-d float tensors), in first-seen key order."""
        grouped: dict[str, list[torch.Tensor]] = {}
        for terms in self.terms:
            for k, v in terms.items():
                grouped.setdefault(k, []).append(v.float())
        return {k: torch.stack(v).mean() for k, v in grouped.items()}


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _default_clip(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class GradientStep:
    """The optimizer step of one algorithm (see the module docstring).

    Args:
        algo: the algorithm's name as printed in errors (``"SAC"``, ``"PPO"``, ``"ETO"``).
        advice: what the user can change when a loss is non-finite (ends the error's ``Fix:`` sentence).
        backward: back-propagates a loss (default ``loss.backward()``; SAC: ``accelerator.backward``, which scales
            the loss under fp16).
        clip_grad_norm: ``(params, max_norm) -> total norm`` (default ``torch.nn.utils.clip_grad_norm_``; SAC:
            ``accelerator.clip_grad_norm_``, which unscales fp16 gradients first).
        autocast: a context manager factory around each micro-batch's loss (default none; SAC:
            ``accelerator.autocast``).
        check_norms: whether gradient norms take part in the finiteness check (False under fp16, where an
            overflowing gradient is routine and the grad scaler skips that step).
    """

    def __init__(
        self,
        algo: str,
        advice: str,
        *,
        backward: Callable[[torch.Tensor], None] | None = None,
        clip_grad_norm: Callable[[Sequence[torch.Tensor], float], Any] | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] | None = None,
        check_norms: bool = True,
    ) -> None:
        self.algo = algo
        self.advice = advice
        self.backward = backward if backward is not None else _default_backward
        self.clip_grad_norm = clip_grad_norm if clip_grad_norm is not None else _default_clip
        self.autocast = autocast if autocast is not None else nullcontext
        self.check_norms = check_norms

    def run(
        self,
        step: int,
        micro_losses: Sequence[MicroLoss],
        groups: Sequence[ParamGroup],
        *,
        dist: Dist | None = None,
        reduce_params: Sequence[torch.Tensor] | None = None,
        context: Callable[[], str] = lambda: "",
    ) -> StepResult:
        """One optimizer step over ``len(micro_losses)`` accumulated micro-batches.

        Args:
            step: index of the update, for the error message.
            micro_losses: one closure per micro-batch, called in order; each returns its 0-d loss (with gradient)
                and its named 0-d terms (detached). The loss is back-propagated divided by the number of closures.
            groups: the parameter groups, in the order they are clipped and stepped.
            dist: the processes; with ``world > 1`` the gradients are averaged over them (one all-reduce).
            reduce_params: the parameters whose gradients are averaged, in this order (default: every group's, in
                group order); only the layout of the one collective depends on it.
            context: describes the data for the error message (called only on a non-finite value).

        Returns:
            :class:`StepResult`: the micro-batches' terms and the measured gradient norms.

        Raises:
            NonFiniteLossError: a term, a micro-batch loss or (with ``check_norms``) a gradient norm is NaN/inf; no
                optimizer was stepped.
        """
        for g in groups:
            g.optimizer.zero_grad(set_to_none=True)
        k = len(micro_losses)
        result = StepResult()
        totals: list[torch.Tensor] = []
        for micro_loss in micro_losses:
            with self.autocast():  # no-op unless the caller asked for mixed precision
                loss, terms = micro_loss()
            result.terms.append(terms)
            totals.append(loss.detach())
            self.backward(loss / k)  # equal micro-batches: the accumulated gradient is that of the batch mean
        if dist is not None and dist.world > 1:  # each process holds its own batch
            params = reduce_params if reduce_params is not None else [p for g in groups for p in g.params]
            average_gradients(params, dist.mean)
        for g in groups:
            if g.train and g.norm_key is not None:
                max_norm = g.max_norm if g.max_norm > 0 else math.inf
                norm = self.clip_grad_norm(g.params, max_norm)
                device = g.params[0].device if g.params else None
                result.norms[g.norm_key] = torch.as_tensor(norm, device=device).float()
        # The one host sync of a step: nothing may be stepped if any term or gradient norm is non-finite.
        checked = [t.float() for terms in result.terms for t in terms.values()] + [t.float() for t in totals]
        if self.check_norms:
            checked += list(result.norms.values())
        if not bool(torch.isfinite(torch.stack(checked)).all()):
            raise self._non_finite(step, result, totals, context)
        for g in groups:
            if g.train:
                g.optimizer.step()
        return result

    def _non_finite(self, step: int, result: StepResult, totals: list[torch.Tensor],
                    context: Callable[[], str]) -> NonFiniteLossError:
        """The error naming the first non-finite value: a micro-batch's term, then a norm, then a total."""
        term, micro = next(self._offenders(result, totals), (TOTAL, None))
        return NonFiniteLossError(self.algo, step, term, micro, context(), self.advice)

    def _offenders(self, result: StepResult,
                   totals: list[torch.Tensor]) -> Iterator[tuple[str, int | None]]:
        for i, terms in enumerate(result.terms):
            for name, value in terms.items():
                if name != TOTAL and not bool(torch.isfinite(value).all()):
                    yield name, i
        if self.check_norms:
            for name, value in result.norms.items():
                if not bool(torch.isfinite(value).all()):
                    yield name, None
        for i, value in enumerate(totals):
            if not bool(torch.isfinite(value).all()):
                yield TOTAL, i if len(totals) > 1 else None


__all__ = ["TOTAL", "GradientStep", "MicroLoss", "NonFiniteLossError", "ParamGroup", "StepResult"]
