"""Benchmark: peak memory and time of one SAC update, memory-lean scoring against the old path (issue 15).

For each model shape and each scorer path (``old`` = ``score_candidates(lean=False)``: every candidate slot through
the LM head at once, seq2seq with the encoder output repeated over the K candidates; ``new`` = the default lean
path), a fresh subprocess builds a random-init model shaped like the real one, wraps it in LoRA (r=16, alpha=32 on
the attention projections, as published), builds the real ``Agent`` and ``SACUpdater`` with the published SAC-GLAM
settings (``experiment=paper_sacglam``, critic warm-up off so the update is a full one: critic + actor + alpha),
and times ``SACUpdater.update`` on one synthetic batch of B states x K candidates (prompts and candidates of random
lengths, all K candidates present). Reported per run on CPU:

* ``peak RSS``: the process's peak resident set size during the update (``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss``, whose high-water mark is reset through ``/proc/self/clear_refs`` just before the update so that
  transient peaks of model building do not count), everything resident included (model, optimizer, Python);
* ``update +``: that peak minus the RSS just before the update: what the update itself adds;
* ``update s``: wall time of the update.

With ``--device cuda`` the model runs in bf16 on the GPU (as ``model.dtype=auto`` trains there) and the peaks are the
GPU's: ``torch.cuda.max_memory_allocated`` during the update (its counter reset just before) and, for ``update +``,
that peak minus ``torch.cuda.memory_allocated`` just before the update; the host RSS is not measured.

The old/new ratios of those three are printed in a markdown table, old and new measured in the same invocation.

    python scripts/bench_memory.py                                   # the three shapes, full depth, batch 256
    python scripts/bench_memory.py --layers 2 --grad-accum 8         # what a 2-core CPU can do (docs/benchmarks.md)
    python scripts/bench_memory.py --quick                           # seconds: tiny shapes (used by the tests)
    python scripts/bench_memory.py --device cuda --grad-accum 4      # on a GPU: bf16, peak CUDA memory

Shapes (vocabularies are the real ones: Flan-T5 32,128, SmolLM2 49,152, Qwen2.5 151,936) follow
``sacglam.models.gpu_models``; ``--layers`` lowers the depth only (hidden sizes, heads and vocabulary
are kept), which shrinks the trunk's share of the memory but not the LM head's.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

MODELS = ("flan-t5-base", "smollm2-135m", "qwen2.5-0.5b")
TINY_MODELS = ("tiny-t5", "tiny-llama")
PATHS = ("old", "new")


# ---------------------------------------------------------------------------------------------------------------------
# models


def build_model(name: str, layers: int | None) -> nn.Module:
    """A random-init model shaped like ``name`` (``sacglam.models.gpu_models``), ``layers`` deep.

    Args:
        name: one of :data:`MODELS` or :data:`TINY_MODELS` (hidden 64, vocabulary 512; for smoke tests).
        layers: number of layers (encoder and decoder each for T5); None keeps the real depth.

    Raises:
        ValueError: an unknown name (names the known ones).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from sacglam.models import gpu_models

    if name in MODELS:
        return gpu_models(layers)[name]()
    if name == "tiny-t5":
        flan: dict[str, Any] = {"tie_word_embeddings": False}  # as gpu_models' Flan-T5 shape
        t5 = T5Config(
            vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=layers or 1, num_decoder_layers=layers or 1,
            num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, **flan,
        )  # fmt: skip
        t5.decoder_start_token_id = 0
        t5._attn_implementation = "sdpa"
        return T5ForConditionalGeneration(t5)
    if name == "tiny-llama":
        llama = LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
        )  # fmt: skip
        llama._attn_implementation = "sdpa"
        return LlamaForCausalLM(llama)
    raise ValueError(f"--models: unknown model {name!r}; choose from {', '.join(MODELS + TINY_MODELS)}")


def make_batch(opts: argparse.Namespace, vocab: int, seed: int = 0) -> Any:
    """A synthetic :class:`~sacglam.types.Batch` of ``opts.batch`` transitions, K candidates each (all present).

    Prompts have ``U[prompt_min, prompt_max]`` real tokens, candidates ``U[cand_min, cand_max]``, right padded to
    the maximum; the next state has the same layout. Half the transitions are relabelled (the hindsight term runs).
    """
    from sacglam.types import Batch

    g = torch.Generator().manual_seed(seed)
    B, K = opts.batch, opts.k

    def state() -> tuple[torch.Tensor, ...]:
        plen = torch.randint(opts.prompt_min, opts.prompt_max + 1, (B,), generator=g)
        pmask = torch.arange(opts.prompt_max) < plen[:, None]
        pids = torch.where(pmask, torch.randint(4, vocab, (B, opts.prompt_max), generator=g), 0)
        clen = torch.randint(opts.cand_min, opts.cand_max + 1, (B, K), generator=g)
        cmask = torch.arange(opts.cand_max) < clen[..., None]
        cids = torch.where(cmask, torch.randint(4, vocab, (B, K, opts.cand_max), generator=g), 0)
        return pids, pmask, cids, cmask

    p, pm, c, cm = state()
    np_, npm, nc, ncm = state()
    zeros = torch.zeros(B, dtype=torch.long)
    relabelled = torch.arange(B) % 2 == 0
    return Batch(
        prompt_ids=p, prompt_mask=pm, cand_ids=c, cand_mask=cm,
        action=torch.randint(0, K, (B,), generator=g), reward=(torch.rand(B, generator=g) < 0.1).float(),
        discount=torch.full((B,), 0.99**3), next_prompt_ids=np_, next_prompt_mask=npm, next_cand_ids=nc,
        next_cand_mask=ncm, terminated=torch.zeros(B, dtype=torch.bool), truncated=torch.zeros(B, dtype=torch.bool),
        n_steps=torch.full((B,), 3), goal=zeros, relabelled=relabelled, goal_gap=torch.where(relabelled, 2, -1),
        goal_limit=torch.full((B,), 10), logp=torch.zeros(B), policy_version=zeros,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# one measured run (in a fresh process)


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_one(name: str, path: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Build the model, agent and updater for ``name``, then measure one SAC update with the ``path`` scorer.

    Meant to run alone in its process (peak RSS is per process). Returns the measurements as a dict.
    """
    from accelerate import Accelerator

    from sacglam.agent import Agent
    from sacglam.algos.sac.learner import SACUpdater
    from sacglam.models import apply_lora, resolve_dtype
    from sacglam.run.tools import published_config
    from sacglam.scoring import score_candidates

    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = published_config([f"algo.grad_accum={opts.grad_accum}", "algo.critic_warmup_updates=0"])
    torch.manual_seed(0)
    model = build_model(name, opts.layers)
    model.config.use_cache = False  # type: ignore[union-attr]
    if opts.gradient_checkpointing:  # as sacglam.models.load_model does for model.gradient_checkpointing=True
        hf: Any = model
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    device = torch.device(opts.device)
    model.to(resolve_dtype("auto", device))  # fp32 on CPU, bf16 on a GPU (as model.dtype=auto trains)
    lora = cfg.model.lora
    lora.enabled = True  # published: LoRA r=16, alpha=32 on the attention projections
    model = apply_lora(model, lora)
    model.train()
    scorer = functools.partial(score_candidates, lean=path == "new")
    agent = Agent(model, cfg.agent, scorer=scorer)
    # The accelerator of --device (a default Accelerator would move the agent to a visible GPU even for --device cpu).
    updater = SACUpdater(agent, cfg.algo, Accelerator(cpu=device.type == "cpu"))
    batch = make_batch(opts, vocab).to(device)
    for _ in range(opts.warmup):
        updater.update(batch)
    gc.collect()
    if device.type == "cuda":
        return _measure_cuda(name, path, model, updater, batch, device)
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    rss_before = _rss_bytes()
    # Resetting VmHWM also resets getrusage's ru_maxrss (both read the kernel's hiwater_rss): from here on it is the
    # peak of the update, with everything already resident (model, optimizer, batch) counted in.
    reset = _reset_peak()
    t0 = time.perf_counter()
    stats = updater.update(batch)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not reset:  # no /proc/self/clear_refs: the process peak (model building included) is all there is
        peak = max(peak, _vm_hwm_bytes())
    return _row(name, path, model, batch, build_peak, rss_before, peak, seconds, stats, reset)


def _row(name: str, path: str, model: nn.Module, batch: Any, build_peak: int, before: int, peak: int,
         seconds: float, stats: Any, reset: bool) -> dict[str, Any]:  # fmt: skip
    """One result row of :func:`run_one` (``before``: host RSS on CPU, GPU bytes allocated on CUDA)."""
    return {
        "model": name,
        "path": path,
        "params": sum(p.numel() for p in model.parameters()),
        "real cand tokens": int(batch.cand_mask.sum() + batch.next_cand_mask.sum()),
        "build peak": build_peak,
        "rss before": before,
        "peak total": peak,
        "update increment": peak - before,
        "seconds": seconds,
        "loss": float(stats["losses/total"]),
        "hwm reset": reset,
    }


def _measure_cuda(name: str, path: str, model: nn.Module, updater: Any, batch: Any,
                  device: torch.device) -> dict[str, Any]:  # fmt: skip
    """:func:`run_one`'s measurement on a GPU: the peak of ``torch.cuda.max_memory_allocated`` during one update
    (counter reset just before it), and the update's wall time between two device synchronisations."""
    torch.cuda.synchronize(device)
    build_peak = torch.cuda.max_memory_allocated(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    stats = updater.update(batch)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    # on CUDA "rss before" holds the bytes allocated on the GPU before the update; the counter reset always works
    return _row(name, path, model, batch, build_peak, before, peak, seconds, stats, True)


# ---------------------------------------------------------------------------------------------------------------------
# driver


def _child_argv(name: str, path: str, opts: argparse.Namespace) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, path]
    for key in ("batch", "k", "grad_accum", "prompt_min", "prompt_max", "cand_min", "cand_max", "threads", "warmup",
                "device"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(opts, key))]
    if opts.layers:
        argv += ["--layers", str(opts.layers)]
    if opts.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv


def _where(device: str, threads: int) -> str:
    """The header's words for where the models ran."""
    if device.startswith("cuda"):
        return (f"random-init bf16 models on {torch.cuda.get_device_name(device)} "
                "(peak = torch.cuda.max_memory_allocated)")
    return (f"random-init fp32 models on CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads} threads)")


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def format_table(results: dict[tuple[str, str], dict[str, Any]], models: Sequence[str], peak: str = "peak RSS") -> str:
    """Markdown: one row per model with old and new peaks and times and their old/new ratios (``peak`` names the
    peak column: ``peak RSS`` on CPU, ``peak CUDA allocated`` on a GPU)."""
    lines = [
        f"| model | params | real cand tokens | {peak} old / new (GiB) | ratio | update + old / new (GiB) | ratio "
        "| update s old / new | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        old, new = results[(name, "old")], results[(name, "new")]
        lines.append(
            f"| {name} | {old['params'] / 1e6:.0f}M | {old['real cand tokens']:,} "
            f"| {_gib(old['peak total'])} / {_gib(new['peak total'])} | {old['peak total'] / new['peak total']:.2f}x "
            f"| {_gib(old['update increment'])} / {_gib(new['update increment'])} "
            f"| {old['update increment'] / max(new['update increment'], 1):.2f}x "
            f"| {old['seconds']:.1f} / {new['seconds']:.1f} | {old['seconds'] / new['seconds']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Parse the arguments; as the driver, run every (model, path) in its own subprocess and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help=f"of {' '.join(MODELS + TINY_MODELS)} (default: the 3)")
    p.add_argument("--layers", type=int, default=None, help="depth of every model (default: the real one)")
    p.add_argument("--batch", type=int, default=256, help="states per update (published: 256)")
    p.add_argument("--k", type=int, default=16, help="candidates per state, all present")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (algo.grad_accum)")
    p.add_argument("--prompt-min", type=int, default=64, help="real prompt tokens, uniform in [min, max]")
    p.add_argument("--prompt-max", type=int, default=96)
    p.add_argument("--cand-min", type=int, default=2, help="tokens per candidate, uniform in [min, max]")
    p.add_argument("--cand-max", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu",
                   help="cpu (fp32, peak RSS) or cuda (bf16, peak torch.cuda.max_memory_allocated)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=0, help="untimed updates before the measured one")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute trunk activations in backward (model.gradient_checkpointing=True)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="seconds: tiny shapes, batch 8, K 4 (used by the tests)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) to this file")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if opts.child is not None:
        name, path = opts.child
        print("RESULT " + json.dumps(run_one(name, path, opts)), flush=True)
        return {}
    if opts.quick:
        opts.models = opts.models or list(TINY_MODELS)
        opts.batch, opts.k, opts.grad_accum = 8, 4, 2
        opts.prompt_min, opts.prompt_max, opts.cand_min, opts.cand_max = 6, 10, 1, 3
    opts.models = opts.models or list(MODELS)
    if opts.batch % opts.grad_accum:
        raise SystemExit(f"--batch {opts.batch} is not divisible by --grad-accum {opts.grad_accum}")
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for name in opts.models:
        for path in PATHS:
            t0 = time.perf_counter()
            proc = subprocess.run(_child_argv(name, path, opts), capture_output=True, text=True, check=False)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(
                    f"{name} ({path}) failed with exit code {proc.returncode} (-9: killed, likely out of memory; "
                    f"try a smaller --batch or a larger --grad-accum):\n{proc.stderr[-3000:]}"
                )
            results[(name, path)] = json.loads(lines[-1][len("RESULT ") :])
            r = results[(name, path)]
            print(
                f"[bench_memory] {name} {path}: peak {_gib(r['peak total'])} GiB, update +"
                f"{_gib(r['update increment'])} GiB, {r['seconds']:.1f} s (process {time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    threads = opts.threads or torch.get_num_threads()
    header = (
        f"One SAC update (SACUpdater.update, paper_sacglam settings, LoRA r=16, critic + actor + alpha), "
        f"{opts.batch} states x {opts.k} candidates, grad_accum {opts.grad_accum} "
        f"(micro-batch {opts.batch // opts.grad_accum}), prompts U[{opts.prompt_min},{opts.prompt_max}] tokens, "
        f"candidates U[{opts.cand_min},{opts.cand_max}] tokens, depth "
        f"{opts.layers or 'real'}{', gradient checkpointing' if opts.gradient_checkpointing else ''}"
        f"{' (--quick)' if opts.quick else ''}; {_where(opts.device, threads)}, torch "
        f"{torch.__version__}. old = score_candidates(lean=False), new = lean (default); each run in a fresh process; "
        f"ratio = old / new."
    )
    table = format_table(results, opts.models, "peak CUDA allocated" if opts.device.startswith("cuda") else "peak RSS")
    print(f"\n{header}\n\n{table}")
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(f"{header}\n\n{table}\n")
    return results


if __name__ == "__main__":
    main()
