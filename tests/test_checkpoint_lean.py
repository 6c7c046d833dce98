"""Lean checkpoints: with a frozen base (LoRA) a checkpoint holds the trainable weights and the base's identity, not
the base; it resumes exactly like a full one, refuses another base naming both, and full checkpoints still load.

The fast tests work on the tiny LoRA agent of ``tests/test_agent.py``; the integration test trains a tiny LoRA run
twice through ``train.py`` (``checkpoint.lean`` true and false) and resumes each from its middle checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import envs  # noqa: F401 - registers the sacglam/ env ids that tools.load_run rebuilds
from sacglam.checkpoint import (
    agent_state,
    base_differences,
    base_identity,
    frozen_base_keys,
    load_agent_state,
    load_checkpoint,
    save_checkpoint,
)
from tests.test_agent import tiny_agent
from tests.test_train import SMALL, _comparable, read_metrics, run_train

torch.set_num_threads(1)


def _adapter_free(key: str, adapters: set[str]) -> bool:
    return adapters.isdisjoint(key.split("."))


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ the agent's state


@pytest.mark.parametrize("separate", [False, True])
def test_lean_state_drops_exactly_the_frozen_base(separate: bool) -> None:
    agent = tiny_agent(lora=True, separate_adapter=separate)
    adapters = set(getattr(agent.model, "peft_config"))  # noqa: B009 - typed Any, not Tensor | Module
    full = agent.state_dict()
    lean = agent_state(agent, "tiny")
    dropped = set(full) - set(lean["agent"])
    # The base weights of the tiny Llama: embeddings, 2 x (7 projections + 2 norms), the final norm, the LM head.
    assert len(dropped) == 21 and dropped == set(frozen_base_keys(agent))
    assert all(k.startswith("model.") and _adapter_free(k, adapters) and "lora_" not in k for k in dropped)
    assert not any(p.requires_grad for n, p in agent.named_parameters(remove_duplicate=False) if n in dropped)
    # Everything that trains or is averaged stays: every adapter (actor, critic, target), the heads and their target.
    kept = set(lean["agent"])
    assert {k for k in full if not _adapter_free(k, adapters)} <= kept
    assert {k for k in full if k.startswith(("heads.", "target_heads."))} <= kept
    assert {a for k in kept for a in k.split(".") if a in adapters} == adapters
    assert lean["base"]["name"] == "tiny" and lean["base"]["tensors"] == 21
    assert lean["base"]["samples"].shape == (21, 8) and lean["base"]["dtype"] == "torch.float32"


def test_full_fine_tuning_and_lean_false_save_every_weight() -> None:
    agent = tiny_agent(lora=False)
    assert frozen_base_keys(agent) == []
    saved = agent_state(agent, "tiny")
    assert list(saved) == ["agent"] and _equal_states(saved["agent"], agent.state_dict())
    lora = tiny_agent(lora=True)
    saved = agent_state(lora, "tiny", lean=False)
    assert list(saved) == ["agent"] and _equal_states(saved["agent"], lora.state_dict())


def _trained(agent: torch.nn.Module) -> torch.nn.Module:
    """Change every trainable and averaged weight (as training and Polyak averaging would)."""
    with torch.no_grad():
        for key, t in agent.state_dict().items():
            if key not in set(frozen_base_keys(agent)):
                t.add_(0.25)
    return agent


def test_lean_state_round_trips_through_a_checkpoint_onto_a_rebuilt_base(tmp_path: Path) -> None:
    agent = _trained(tiny_agent(lora=True, separate_adapter=True))
    path = save_checkpoint(tmp_path, 7, {"algo": "sac", **agent_state(agent, "tiny")}, keep=0)
    state = load_checkpoint(path)  # weights_only: the identity is plain strings, ints and a tensor
    fresh = tiny_agent(lora=True, separate_adapter=True)  # the same base (seed 0), untrained adapters and heads
    assert not _equal_states(fresh.state_dict(), agent.state_dict())
    load_agent_state(fresh, state, path, "tiny")
    assert _equal_states(fresh.state_dict(), agent.state_dict())


def test_old_full_checkpoint_still_loads(tmp_path: Path) -> None:
    """A checkpoint without "base" (written before lean checkpoints, or lean=false) loads every weight as before."""
    agent = _trained(tiny_agent(lora=True))
    path = save_checkpoint(tmp_path, 3, {"algo": "sac", "agent": agent.state_dict()}, keep=0)
    other = tiny_agent(lora=True, seed=5)  # even another base: a full checkpoint overwrites it
    load_agent_state(other, load_checkpoint(path), path, "tiny")
    assert _equal_states(other.state_dict(), agent.state_dict())


def test_another_base_is_refused_naming_both(tmp_path: Path) -> None:
    agent = tiny_agent(lora=True)
    state = agent_state(agent, "base-a")
    other = _trained(tiny_agent(lora=True, seed=1))  # same architecture and config, other base weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="weights differ") as info:
        load_agent_state(other, state, tmp_path / "step_1.pt", "base-b")
    message = str(info.value)
    assert "step_1.pt was written over the base model 'base-a'" in message
    assert "this run's base model is 'base-b'" in message and "model.name=base-a" in message
    assert _equal_states(other.state_dict(), before), "a refused load changed the agent"


def test_identity_compares_config_shapes_and_weights() -> None:
    a = base_identity(tiny_agent(lora=True), "tiny")
    assert base_differences(a, base_identity(tiny_agent(lora=True), "tiny")) == []
    assert base_differences(a, base_identity(tiny_agent(lora=True, seed=2), "tiny")) == ["weights"]
    changed = {**a, "config_sha256": "0" * 64}
    assert base_differences(changed, a) == ["config"]
    reshaped = {**a, "structure_sha256": "0" * 64}
    assert base_differences(reshaped, a) == ["shapes"]


def test_identity_across_dtypes_is_compared_to_bf16_precision() -> None:
    """A run evaluated in bf16 loads a checkpoint trained in fp32 (same base), but not one of another base."""
    fp32 = base_identity(tiny_agent(lora=True), "tiny")
    bf16_agent = tiny_agent(lora=True).to(torch.bfloat16)
    bf16 = base_identity(bf16_agent, "tiny")
    assert bf16["dtype"] == "torch.bfloat16" and not torch.equal(fp32["samples"], bf16["samples"])
    assert base_differences(fp32, bf16) == []
    other = base_identity(tiny_agent(lora=True, seed=3).to(torch.bfloat16), "tiny")
    assert base_differences(fp32, other) == ["weights"]


def test_samples_are_at_evenly_spaced_integer_positions() -> None:
    from sacglam.checkpoint import _samples

    assert _samples(torch.arange(10.0)).tolist() == [0, 1, 2, 3, 5, 6, 7, 9]  # i * 9 // 7
    # SmolLM2's embedding has 28,311,552 elements: float32 positions rounded its last one past the end.
    big = torch.zeros(28_311_552, dtype=torch.uint8)
    big[-1], big[28_311_551 // 7] = 5, 3
    assert _samples(big).tolist() == [0, 3, 0, 0, 0, 0, 0, 5]


# ---------------------------------------------------------------------------------------- train.py, end to end

LORA_RUN = [*SMALL, "total_env_steps=256", "buffer.capacity=4096", "model.lora.enabled=true", "model.lora.r=4",
            "checkpoint.every=128", "checkpoint.keep=0", "eval.every=128", "seed=3"]


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages of every tensor in a nested state (what torch.save writes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _resume_middle(run: Path, out: Path, extra: list[str]) -> Any:
    """A copy of ``run`` as a kill after its step-128 checkpoint leaves it, resumed with ``resume=auto``."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step_0000000128.pt", out / "checkpoints")
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")  # resume cuts it back to the checkpoint's lines
    return run_train([*LORA_RUN, *extra, "resume=auto"], out)


@pytest.mark.integration
def test_lora_run_lean_checkpoint_size_resume_and_refusal(tmp_path: Path) -> None:
    runs = {}
    for flag in ("true", "false"):
        runs[flag] = tmp_path / f"lean_{flag}"
        result = run_train([*LORA_RUN, f"checkpoint.lean={flag}"], runs[flag])
        assert result.returncode == 0, result.stderr[-3000:]
    reference = _comparable(read_metrics(runs["false"]))
    assert _comparable(read_metrics(runs["true"])) == reference, "checkpoint.lean changed the training"

    lean_path, full_path = (runs[k] / "checkpoints" / "step_0000000128.pt" for k in ("true", "false"))
    lean, full = load_checkpoint(lean_path, weights_only=False), load_checkpoint(full_path, weights_only=False)
    base_keys = set(full["agent"]) - set(lean["agent"])
    assert "base" in lean and "base" not in full and lean["base"]["tensors"] == len(base_keys) > 0
    assert all("lora_" not in k for k in base_keys), "an adapter weight was left out"
    assert all("lora_" in k for k in lean["agent"] if k.startswith("model.")), "a base weight is in the checkpoint"
    embed = next(k for k in base_keys if "embed_tokens" in k)
    assert not any(tuple(v.shape) == tuple(full["agent"][embed].shape) for v in lean["agent"].values())
    # The file is the trainable state plus the buffer (and small pickled records); the difference is the base.
    base_bytes = _tensor_bytes({k: full["agent"][k] for k in base_keys})
    lean_size, full_size = lean_path.stat().st_size, full_path.stat().st_size
    assert lean_size <= _tensor_bytes(lean) + 256 * 1024
    assert abs((full_size - lean_size) - base_bytes) <= 512 * len(base_keys) + 16 * 1024

    for lean_flag, run in runs.items():
        resumed = tmp_path / f"resumed_{lean_flag}"
        result = _resume_middle(run, resumed, [f"checkpoint.lean={lean_flag}"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from" in result.stdout and "at env step 128" in result.stdout
        assert _comparable(read_metrics(resumed)) == reference, f"resume from lean={lean_flag} differs"

    result = _resume_middle(runs["true"], tmp_path / "other_base", ["model.init_seed=1"])
    assert result.returncode != 0
    assert "was written over the base model 'tiny'" in result.stderr
    assert "this run's base model is 'tiny'" in result.stderr and "weights differ" in result.stderr
    assert json.loads((runs["true"] / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 256


@pytest.mark.integration
def test_scripts_rebuild_the_base_under_a_lean_checkpoint(tmp_path: Path) -> None:
    """evaluate.py and export_policy.py load runs through tools.load_run: a lean run's agent equals a full run's."""
    from sacglam.run import tools

    agents = {}
    for lean in ("true", "false"):
        run = tmp_path / f"lean_{lean}"
        args = [o for o in LORA_RUN if not o.startswith(("checkpoint.every", "eval.every"))]
        result = run_train([*args, "total_env_steps=128", "checkpoint.every=0", "eval.every=0",
                            f"checkpoint.lean={lean}"], run)
        assert result.returncode == 0, result.stderr[-3000:]
        agents[lean] = tools.load_run(run, ["device=cpu"]).agent.state_dict()
    assert _equal_states(agents["true"], agents["false"])
    with pytest.raises(tools.RunError, match=r"was written over the base model 'tiny'.*weights differ"):
        tools.load_run(tmp_path / "lean_true", ["device=cpu", "model.init_seed=4"])  # another base
