"""The shared optimizer step (sacglam.algos.optim): accumulation, all-reduce, per-group clipping, the finiteness check,
and that SAC, PPO and ETO update through it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

from sacglam.algos.optim import GradientStep, MicroLoss, NonFiniteLossError, ParamGroup, StepResult
from sacglam.distributed import Dist

torch.set_num_threads(1)


def _model(seed: int = 0) -> nn.Sequential:
    """Two layers: two parameter groups (first, second)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen, dtype=torch.double), torch.randn(n, 2, generator=gen, dtype=torch.double)


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> list[MicroLoss]:
    """k equal micro-batches of the mean squared error (a mean, so the micro-batch means average to the batch's)."""
    m = x.shape[0] // k

    def one(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = ((model(x[i * m : (i + 1) * m]) - y[i * m : (i + 1) * m]) ** 2).mean()
        return loss, {"losses/mse": loss.detach(), "losses/total": loss.detach()}

    return [partial(one, i) for i in range(k)]


def _groups(model: nn.Sequential, max_norms: tuple[float, float] = (0.0, 0.0), lr: float = 0.1) -> list[ParamGroup]:
    return [ParamGroup(list(model[0].parameters()), torch.optim.SGD(model[0].parameters(), lr=lr), max_norms[0],
                       "charts/grad_norm_first"),
            ParamGroup(list(model[2].parameters()), torch.optim.SGD(model[2].parameters(), lr=lr), max_norms[1],
                       "charts/grad_norm_second")]


def _norm(params: list[nn.Parameter]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_make_the_full_batch_step(k: int) -> None:
    x, y = _data(8)
    full, accum = _model(), _model()
    step = GradientStep("TEST", "nothing")
    one = step.run(0, _losses(full, x, y, 1), _groups(full))
    many = step.run(0, _losses(accum, x, y, k), _groups(accum))
    for p, q in zip(full.parameters(), accum.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)  # without / k: k times the gradient
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert len(many.terms) == k and len(one.terms) == 1
    torch.testing.assert_close(many.means()["losses/mse"], one.means()["losses/mse"])
    torch.testing.assert_close(many.norms["charts/grad_norm_first"], one.norms["charts/grad_norm_first"])
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), _model().parameters(), strict=True))


def test_clipping_clips_each_group_to_its_max_norm_and_leaves_small_gradients_alone() -> None:
    x, y = _data(8)
    y = y * 100  # large errors: large gradients
    free = _model()
    GradientStep("TEST", "nothing").run(0, _losses(free, x, y, 1), _groups(free, lr=0.0))
    norms = [_norm(list(free[i].parameters())) for i in (0, 2)]
    assert min(norms) > 1.0
    limits = (0.5, norms[1] * 2)  # the first group above its limit, the second below
    clipped = _model()
    out = GradientStep("TEST", "nothing").run(0, _losses(clipped, x, y, 1), _groups(clipped, limits, lr=0.0))
    assert math.isclose(_norm(list(clipped[0].parameters())), 0.5, rel_tol=1e-6)  # clipped to its own max norm
    for p, q in zip(clipped[2].parameters(), free[2].parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad)  # below its max norm
    # The logged norms (float32) are those before clipping, per group.
    assert math.isclose(float(out.norms["charts/grad_norm_first"]), norms[0], rel_tol=1e-6)
    assert math.isclose(float(out.norms["charts/grad_norm_second"]), norms[1], rel_tol=1e-6)


def _adam_model() -> tuple[nn.Sequential, list[ParamGroup], GradientStep]:
    """A model after one finite Adam step (so an accidental step would move it) and its groups."""
    model = _model()
    groups = [ParamGroup(list(model[0].parameters()), torch.optim.Adam(model[0].parameters(), lr=0.1), 1.0,
                         "charts/grad_norm_first"),
              ParamGroup(list(model[2].parameters()), torch.optim.Adam(model[2].parameters(), lr=0.1), 1.0,
                         "charts/grad_norm_second")]
    step = GradientStep("TEST", "lower the test's learning rate")
    x, y = _data(8)
    step.run(0, _losses(model, x, y, 2), groups)
    return model, groups, step


def _nan_in_micro_batch(model: nn.Module, bad: int, k: int = 3) -> list[MicroLoss]:
    x, y = _data(12)
    good = _losses(model, x, y, k)

    def poisoned(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms = good[i]()
        if i == bad:
            part = loss * float("nan")
            terms = {"losses/mse": terms["losses/mse"], "losses/part": part.detach()}
            loss = loss + part
        return loss, terms

    return [partial(poisoned, i) for i in range(k)]


def test_a_non_finite_loss_raises_naming_algorithm_step_and_term_and_steps_nothing() -> None:
    model, groups, step = _adam_model()
    before = copy.deepcopy(model.state_dict())
    states = [copy.deepcopy(g.optimizer.state_dict()) for g in groups]
    with pytest.raises(NonFiniteLossError, match=r"non-finite losses/part at TEST update 17 \(micro-batch 1\); "
                                                 r"batch 9\. No optimizer step was taken\. Fix: lower the test's "
                                                 r"learning rate; resume") as err:
        step.run(17, _nan_in_micro_batch(model, bad=1), groups, context=lambda: "batch 9")
    assert (err.value.algo, err.value.step, err.value.term, err.value.micro_batch) == ("TEST", 17, "losses/part", 1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for g, state in zip(groups, states, strict=True):
        assert g.optimizer.state_dict()["state"][0]["step"] == state["state"][0]["step"]


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_a_non_finite_gradient_norm_raises_unless_norms_are_unchecked() -> None:
    def nan_grad(model: nn.Sequential) -> list[MicroLoss]:
        x, y = _data(8)

        def one() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = ((model[2](_NaNGrad.apply(model[1](model[0](x)))) - y) ** 2).mean()
            return loss, {"losses/mse": loss.detach()}

        return [one]

    model, groups, step = _adam_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteLossError, match=r"non-finite charts/grad_norm_first at TEST update 3\. No"):
        step.run(3, nan_grad(model), groups)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Under fp16 an overflowing gradient is the grad scaler's business: norms are not checked (losses still are).
    lenient = GradientStep("TEST", "nothing", check_norms=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite losses/part at TEST update 3 \(micro-batch 0\)\. No"):
        lenient.run(3, _nan_in_micro_batch(model, bad=0), groups)
    lenient.run(3, nan_grad(model), groups)  # went through: the NaN gradient reached the weights
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _HalfDist(Dist):
    """Two processes, the other one holding zero gradients: the mean halves every gradient."""

    def __init__(self) -> None:
        super().__init__(rank=0, world=2)
        self.calls = 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return t / 2


def test_gradients_are_averaged_over_processes_in_one_collective() -> None:
    x, y = _data(8)
    alone, together = _model(), _model()
    step = GradientStep("TEST", "nothing")
    step.run(0, _losses(alone, x, y, 2), _groups(alone, lr=0.0), dist=Dist())
    dist = _HalfDist()
    groups = _groups(together, lr=0.0)
    groups[1].train = False  # averaged too, but neither clipped, measured nor stepped
    out = step.run(0, _losses(together, x, y, 2), groups, dist=dist)
    assert dist.calls == 1 and list(out.norms) == ["charts/grad_norm_first"]
    for p, q in zip(alone.parameters(), together.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(q.grad, p.grad / 2)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (algorithm, number of micro-batches) of every GradientStep.run."""
    calls: list[tuple[str, int]] = []
    original: Callable[..., StepResult] = GradientStep.run

    def run(self: GradientStep, step: int, micro_losses: Any, *args: Any, **kwargs: Any) -> StepResult:
        calls.append((self.algo, len(micro_losses)))
        return original(self, step, micro_losses, *args, **kwargs)

    monkeypatch.setattr(GradientStep, "run", run)
    return calls


def test_sac_updates_through_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from sacglam.algos.sac.learner import NonFiniteLossError as Reexported
    from sacglam.algos.sac.learner import SACConfig, SACUpdater
    from tests.test_agent import make_batch, tiny_agent

    assert Reexported is NonFiniteLossError
    calls = _counting(monkeypatch)
    updater = SACUpdater(tiny_agent(lora=True), SACConfig(critic_warmup_updates=0, grad_accum=2))
    updater.update(make_batch(size=8))
    assert calls == [("SAC", 2)]
    bad = make_batch(size=8)
    bad.reward[5] = float("nan")  # second micro-batch
    with pytest.raises(NonFiniteLossError, match=r"losses/critic at SAC update 1 \(micro-batch 1\).*alpha_init"):
        updater.update(bad)


def test_ppo_updates_through_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from sacglam.algos.ppo.learner import PPOConfig, PPOUpdater
    from tests.test_ppo import _ppo_agent, _rollout

    calls = _counting(monkeypatch)
    agent = _ppo_agent(lora=False)
    cfg = PPOConfig(minibatch_size=4, epochs=2, grad_accum=2, value_hidden=[16])
    updater = PPOUpdater(agent, cfg, batch_size=8)
    flat = _rollout(agent, 8)
    updater.update(flat)
    assert calls == [("PPO", 2)] * 4  # 2 epochs x 2 minibatches, each of 2 micro-batches
    before = [p.detach().clone() for p in agent.parameters()]
    flat["returns"][:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite losses/value at PPO update 1 \(micro-batch 0\); "
                                                 r"rollout of 8 transitions, epoch 0, minibatch 0\..*algo\.lr"):
        updater.update(flat)
    assert all(torch.equal(p, q) for p, q in zip(before, agent.parameters(), strict=True))


def test_eto_steps_through_the_step_and_gains_the_finiteness_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import sacglam.algos.eto.trainer as trainer_module
    from tests.test_eto_train import _setup, _trainer

    s = _setup(["algo.tasks=2", "algo.warm_start_episodes=4", "algo.sft_batch_size=2"])
    trainer = _trainer(s)
    trainer.collect_expert(10_000)
    trainer.start_phase(1e-3)
    calls = _counting(monkeypatch)
    trainer.sft_epoch()
    assert calls == [("ETO", 1)] * 2 and trainer.updates == 2  # 4 expert episodes in batches of 2
    before = [p.detach().clone() for p in s["agent"].parameters()]
    real_sft_loss = trainer_module.sft_loss
    monkeypatch.setattr(trainer_module, "sft_loss", lambda logp, lengths: real_sft_loss(logp, lengths) * math.inf)
    with pytest.raises(NonFiniteLossError, match=r"non-finite losses/sft at ETO update 2 \(micro-batch 0\); "
                                                 r"behaviour cloning epoch 1 on 2 expert trajectories\..*sft_lr"):
        trainer.sft_epoch()
    assert trainer.updates == 2
    assert all(torch.equal(p, q) for p, q in zip(before, s["agent"].parameters(), strict=True))
