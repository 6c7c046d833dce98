"""Benchmark: shared-prefix candidate scoring versus the naive repeat-the-prompt scorer.

For K candidates per state, an ``Lp``-token prompt and candidates of 6-10 tokens, the naive scorer runs
``K * Lp + sum Lc`` tokens per state, the shared one ``Lp + sum Lc``. The table prints states/s and useful tokens/s
(``Lp + sum Lc`` per state) for both, the measured speed ratio beside that token saving, and the largest score
difference between the two scorers (a correctness check in the same run).

    python scripts/bench_scoring.py                      # tiny model on CPU (fp32)
    python scripts/bench_scoring.py --device cuda        # Flan-T5-base, SmolLM2-135M, Qwen2.5-0.5B shapes (bf16)
    python scripts/bench_scoring.py --quick              # seconds; used by the tests
    python scripts/bench_scoring.py --backward           # forward + backward (what an actor update pays)

Models on GPU are random-init from configs shaped like the real ones (no download needed); speed does not depend on
the weights.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sacglam.models import gpu_models
from sacglam.scoring import ScoreOutput, score_candidates, score_candidates_naive

Scorer = Callable[..., ScoreOutput]


def tiny_model(vocab: int = 256, hidden: int = 64, layers: int = 2, heads: int = 2, inter: int = 128) -> nn.Module:
    """The project's default tiny Llama-style model (docs/design/CALIBRATION.md), vocabulary of a word-level env
    tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def make_batch(
    batch: int, k: int, lp: int, lc_range: tuple[int, int], vocab: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full ``lp``-token prompts and K candidates with lengths uniform in ``lc_range`` (right padded)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (batch, lp), generator=g)
    prompt_mask = torch.ones(batch, lp, dtype=torch.bool)
    lc_max = lc_range[1]
    clen = torch.randint(lc_range[0], lc_range[1] + 1, (batch, k), generator=g)
    cand_mask = torch.arange(lc_max) < clen[..., None]
    cand_ids = torch.where(cand_mask, torch.randint(4, vocab, (batch, k, lc_max), generator=g), 0)
    return tuple(t.to(device) for t in (prompt_ids, prompt_mask, cand_ids, cand_mask))  # type: ignore[return-value]


def time_scorers(
    scorers: dict[str, Scorer],
    model: nn.Module,
    args: Sequence[torch.Tensor],
    backward: bool,
    repeats: int,
    device: torch.device,
) -> dict[str, tuple[float, ScoreOutput]]:
    """Best-of-``repeats`` seconds per call of each scorer, interleaved call by call so that load from other
    processes hits all alike (the minimum is the least noisy estimate on a shared machine).

    Returns:
        name -> (seconds, last output).
    """

    def call(fn: Scorer) -> tuple[float, ScoreOutput]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if backward:
            model.zero_grad(set_to_none=True)
            out = fn(model, *args)
            (out.logp.sum() + out.hidden.float().pow(2).mean()).backward()
        else:
            with torch.inference_mode():
                out = fn(model, *args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out

    for fn in scorers.values():
        call(fn)  # warm-up: kernels, allocator, lazy init
    times: dict[str, list[float]] = {name: [] for name in scorers}
    outs: dict[str, ScoreOutput] = {}
    for _ in range(repeats):
        for name, fn in scorers.items():
            t, outs[name] = call(fn)
            times[name].append(t)
    return {name: (min(times[name]), outs[name]) for name in scorers}


def bench_model(
    name: str, model: nn.Module, opts: argparse.Namespace, device: torch.device, vocab: int
) -> list[dict[str, Any]]:
    scorers: dict[str, Scorer] = {
        "naive": score_candidates_naive,
        "packed": functools.partial(score_candidates, method="packed"),
    }
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if not seq2seq:  # encoder-decoder models have one shared method (encoder once, decoder per candidate)
        scorers["cache"] = functools.partial(score_candidates, method="cache")
    rows = []
    for k in opts.ks:
        args = make_batch(opts.batch, k, opts.prompt_len, (opts.cand_min, opts.cand_max), vocab, device)
        sum_lc = float(args[3].sum()) / opts.batch  # mean real candidate tokens per state
        saving = (k * opts.prompt_len + sum_lc) / (opts.prompt_len + sum_lc)
        res = time_scorers(scorers, model, args, opts.backward, opts.repeats, device)
        t_naive, out_naive = res["naive"]
        useful = opts.batch * (opts.prompt_len + sum_lc)
        row: dict[str, Any] = {"model": name, "K": k}
        for method in ("naive", "packed", "cache"):
            row[f"{method} states/s"] = opts.batch / res[method][0] if method in res else "-"
        for method in ("naive", "packed", "cache"):
            row[f"{method} tok/s"] = useful / res[method][0] if method in res else "-"
        for method in ("packed", "cache"):
            row[f"ratio {method}"] = t_naive / res[method][0] if method in res else "-"
        row["token saving"] = saving
        row["max abs dlogp"] = max(float((out.logp - out_naive.logp).abs().max()) for _, out in res.values())
        rows.append(row)
        print(f"  {name} K={k}: ratio {row['ratio packed']:.2f} (tokens {saving:.2f})", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "|".join("---" for _ in keys) + "|")
    for r in rows:
        cells = []
        for key in keys:
            v = r[key]
            if isinstance(v, float):
                cells.append(f"{v:.1e}" if key.startswith("max") else f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
            else:
                cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (tiny model, fp32) or cuda (three real-shaped models, bf16)")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32], help="candidates per state")
    p.add_argument("--batch", type=int, default=None, help="states per call (default 16 on CPU, 32 on GPU)")
    p.add_argument("--prompt-len", type=int, default=80)
    p.add_argument("--cand-min", type=int, default=6)
    p.add_argument("--cand-max", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (best reported)")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of inference")
    p.add_argument(
        "--models",
        nargs="*",
        default=None,
        help="real-shaped models to run (default on cuda: all of flan-t5-base smollm2-135m qwen2.5-0.5b)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run in seconds")
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.quick:
        opts.ks, opts.prompt_len, opts.repeats = [2, 4], 12, 2
        opts.cand_min, opts.cand_max = 2, 4
        opts.batch = opts.batch or 2
    opts.batch = opts.batch or (16 if device.type == "cpu" else 32)
    torch.manual_seed(0)

    models: dict[str, tuple[Callable[[], nn.Module], torch.dtype]] = {}
    if opts.models is None and (device.type == "cpu" or opts.quick):
        models["tiny (64x2)"] = (tiny_model, torch.float32)
    else:
        # bf16 on an accelerator; fp32 on CPU (bf16 is ~4x slower there), e.g. to check the builders without a GPU
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        for name, build in gpu_models().items():
            if opts.models is None or name in opts.models:
                models[name] = (build, dtype)
    rows: list[dict[str, Any]] = []
    for name, (build, dtype) in models.items():
        model = build().to(device=device, dtype=dtype)
        model.eval()  # no dropout, so both scorers compute the same function (gradients still flow)
        vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
        rows += bench_model(name, model, opts, device, vocab)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mode = "forward+backward" if opts.backward else "forward (inference)"
    print(
        f"\nScoring {mode} on {device.type} ({torch.get_num_threads()} threads), {opts.batch} states per call, "
        f"Lp={opts.prompt_len}, Lc~U[{opts.cand_min},{opts.cand_max}]; "
        "ratio = naive time / shared time (packed: block-mask packing; cache: prompt KV cache repeated over K); "
        f"token saving = (K*Lp + sum Lc) / (Lp + sum Lc)\n"
    )
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
