"""Benchmark: end-to-end SAC training throughput with the published settings, and the update step's MFU.

The loop is built from the library pieces exactly as ``train.py`` wires them (vector env -> ``Collector`` ->
``StepEncoder`` -> ``ReplayBuffer`` -> ``SACUpdater``), with the published SAC-GLAM settings taken from the
``experiment=paper_sacglam`` preset (32 envs, replay ratio 4, batch 256: one update every two vector steps). Each
phase is timed separately (collect = env step + acting forward, add = tokenise + buffer write, sample, update), with a
device synchronisation around every timed call. Evaluation is not part of the loop timed here.

Scored tokens are counted from the masks (real tokens only, padding excluded): the acting pass (forward), the online
update pass on ``s`` (forward + backward) and the target pass on ``s'`` (forward, non-terminal transitions only: the
others are not scored). The update's model FLOPs are ``6 * P * tokens`` for the online pass and ``2 * P * tokens`` for
the target pass, where ``P`` is the number of weights a token goes through (see :func:`path_params`), plus the Q heads
(forward per present candidate, backward per taken one: :func:`update_flops`); MFU divides them by the update time
and by the device's matmul rate measured in the same run (bf16 on a GPU, the model's dtype on CPU). These counts
follow the update as it runs since issue 28; older tables counted every transition's ``s'`` and a forward and
backward of the heads on every present candidate.

    python scripts/bench.py                       # tiny model on CPU, published settings
    python scripts/bench.py --quick               # seconds: 4 envs, batch 16 (used by the tests)
    python scripts/bench.py --device cuda         # random-init Flan-T5-base, SmolLM2-135M, Qwen2.5-0.5B shapes, bf16
    python scripts/bench.py --device cuda --models qwen2.5-0.5b --out docs/bench_gpu.md

GPU models are random-init from configs shaped like the real ones (``sacglam.models.gpu_models``), with LoRA r=16 as
published, and a word-level tokenizer built from the env's text (about one token per word; a real BPE tokenizer
gives roughly 1.3x more tokens per prompt, so real-model token counts and update times are somewhat higher).

Reference (docs/design/ALGORITHM.md section 8): the published stack (Flan-T5-base, 4-bit LoRA, 32 envs) does about
4,000
episodes per hour on one RTX 4090, and 500k episodes in 80 H100-hours (6,250 episodes per H100-hour).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

from sacglam.run.tools import published_config

# Published stack (docs/design/ALGORITHM.md section 8).
PUBLISHED_4090_EPISODES_PER_HOUR = 4000.0
PUBLISHED_H100_EPISODES_PER_HOUR = 500_000 / 80
GPU_MODELS = ("flan-t5-base", "smollm2-135m", "qwen2.5-0.5b")
PHASES = ("collect", "add", "sample", "update")


# ---------------------------------------------------------------------------------------------------------------------
# model FLOPs


def _matmul_params(module: nn.Module) -> int:
    """Weights of ``module`` that a token multiplies through: every parameter except embedding tables (a lookup,
    not a matmul) and LoRA adapters (under 1% of the work, and a LoRA agent holds a target adapter no pass uses)."""
    total = 0
    for name, p in module.named_parameters():
        parts = name.split(".")
        if "embed_tokens" in parts or "shared" in parts or any(x.startswith("lora_") for x in parts):
            continue
        total += p.numel()
    return total


def path_params(model: nn.Module) -> tuple[int, int]:
    """Weights one prompt token and one candidate token go through in the scorer.

    Decoder-only: the trunk (no embedding table) for both, plus the LM head for candidate tokens (the scorer takes
    logits at candidate positions only). Seq2seq (T5): the encoder for prompt tokens; the decoder (self- and
    cross-attention, MLP) plus the LM head for candidate tokens.

    Returns:
        (prompt_params, candidate_params).
    """
    from sacglam.models import is_seq2seq, unwrap

    inner = unwrap(model)
    head = inner.get_output_embeddings()
    head_params = int(head.weight.numel()) if head is not None else 0
    if is_seq2seq(model):
        return _matmul_params(inner.get_encoder()), _matmul_params(inner.get_decoder()) + head_params
    trunk = _matmul_params(inner.base_model)
    return trunk, trunk + head_params


def update_flops(
    prompt_params: int, cand_params: int, head_params: int, online: tuple[float, float, float],
    target: tuple[float, float, float], taken: float,
) -> float:  # fmt: skip
    """Model FLOPs of SAC updates, counting the work the update needs (docs/design/ALGORITHM.md section 2).

    The trunk: ``6 x`` per token of the online pass (forward + backward), ``2 x`` per token of the target pass, which
    scores the non-terminal transitions only. The Q heads: ``2 x`` per present candidate of either pass (forward;
    the actor's Q values over every candidate take no gradient) plus ``4 x`` per taken candidate (the critic loss's
    backward runs on the taken ones only).

    Args:
        prompt_params: weights per prompt token; cand_params: weights per candidate token.
        head_params: weights of the Q heads.
        online: (prompt tokens, candidate tokens, present candidates) of the online pass on ``s``.
        target: the same for the target pass on ``s'``, over the non-terminal transitions.
        taken: taken candidates (the batch size summed over the updates).

    Returns:
        FLOPs.
    """

    def trunk(counts: tuple[float, float, float]) -> float:
        return prompt_params * counts[0] + cand_params * counts[1]

    heads = 2.0 * head_params * (online[2] + target[2]) + 4.0 * head_params * taken
    return 6.0 * trunk(online) + 2.0 * trunk(target) + heads


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best measured FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        (a @ b).sum()
        _sync(device)
        if i > 0:  # the first call is a warm-up
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# models


def build_model(name: str, cfg: Any, corpus: list[str], device: torch.device) -> tuple[nn.Module, Any]:
    """The tiny model through ``load_model``, or a random-init real-shaped model with LoRA and a word tokenizer.

    Raises:
        ValueError: an unknown model name (names the known ones).
    """
    from sacglam.models import apply_lora, build_tiny_tokenizer, load_model, resolve_dtype

    if name == "tiny":
        return load_model(cfg.model, corpus=corpus, device=device)
    if name not in GPU_MODELS:
        raise ValueError(f"--models: unknown model {name!r}; choose from tiny, {', '.join(GPU_MODELS)}")
    from sacglam.models import gpu_models

    tokenizer = build_tiny_tokenizer(corpus, cfg.model.tokenizer_cache)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf: Any = gpu_models()[name]().to(resolve_dtype("auto", device))
    hf.config.use_cache = False  # scoring never decodes token by token
    lora = cfg.model.lora
    lora.enabled = True  # published: LoRA r=16, alpha=32 on the attention projections
    model = apply_lora(hf, lora)
    model.to(device)
    model.train()
    return model, tokenizer


class CountingActor:
    """Wraps the agent's ``act`` and counts the real prompt and candidate tokens it scores (on the device)."""

    def __init__(self, agent: Any, device: torch.device) -> None:
        self.agent = agent
        self.tokens = torch.zeros((), dtype=torch.long, device=device)

    def act(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cand_ids: torch.Tensor,
            cand_mask: torch.Tensor, *, greedy: bool, generator: torch.Generator | None) -> Any:  # fmt: skip
        self.tokens += prompt_mask.sum() + cand_mask.sum()
        return self.agent.act(prompt_ids, prompt_mask, cand_ids, cand_mask, greedy=greedy, generator=generator)


# ---------------------------------------------------------------------------------------------------------------------
# the timed loop


@dataclass
class Timings:
    """Seconds spent per phase of the loop, and what was done in them."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    env_steps: int = 0
    updates: int = 0
    episodes: int = 0
    episode_steps: int = 0

    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Loop:
    """The benchmarked loop's pieces, wired as ``train.py`` wires them (see :func:`build_loop`)."""

    cfg: Any
    vec: Any
    model: nn.Module
    agent: Any
    updater: Any
    buffer: Any
    encoder: Any
    actor: CountingActor
    collector: Any
    sample_gen: torch.Generator
    desc: dict[str, Any]  # sacglam.models.describe of the model: params, trainable, dtype


def build_loop(name: str, cfg: Any, device: torch.device) -> Loop:
    """Vector env, model, codec, agent, updater, buffer, step encoder and collector for ``name``, seeded with 0."""
    from envs.vector import make_vector_env
    from sacglam.agent import Agent
    from sacglam.algos.sac.learner import SACUpdater
    from sacglam.collector import Collector
    from sacglam.models import describe, is_seq2seq
    from sacglam.pipeline import StepEncoder, env_corpus, make_act_fn
    from sacglam.replay.buffer import ReplayBuffer
    from sacglam.run.builders import make_codec, make_env_fn

    seed = 0
    torch.manual_seed(seed)
    probe = make_env_fn(cfg)()
    vec = make_vector_env(cfg.env.id, cfg.env.num_envs, env_kwargs=dict(cfg.env.kwargs), mode=cfg.env.vector)
    corpus = env_corpus(probe, cfg.env.corpus_episodes, seed=seed + 12345)
    model, tokenizer = build_model(name, cfg, corpus, device)
    codec = make_codec(cfg, tokenizer, seq2seq=is_seq2seq(model))
    agent = Agent(model, cfg.agent).to(device)
    updater = SACUpdater(agent, cfg.algo)
    buffer = ReplayBuffer(cfg.buffer, cfg.env.num_envs, pad_id=codec.pad_id, device=device, prompt=codec)
    # cast: ReplayBuffer / make_act_fn satisfy the GoalRegistry / ActFn protocols at run time but not for mypy
    # (train.py wires them the same way).
    encoder = StepEncoder(codec, cast(Any, buffer), probe.goal_step_limit, cfg.buffer.max_achieved)
    actor = CountingActor(agent, device)
    act_gen = torch.Generator(device).manual_seed(seed + 1)
    sample_gen = torch.Generator(buffer.device).manual_seed(seed + 2)
    act_fn = make_act_fn(actor, codec, greedy=False, device=device, generator=act_gen)
    collector = Collector(vec, cast(Any, act_fn), seed=seed)
    return Loop(cfg, vec, model, agent, updater, buffer, encoder, actor, collector, sample_gen, describe(model))


def warm_up(loop: Loop, name: str, updates: int, device: torch.device) -> None:
    """Untimed: fill the buffer to ``learning_starts`` with completed episodes, then run the critic warm-up updates
    and ``updates`` more, so the timed updates are full ones (actor + critic + alpha) with warm kernels.

    Raises:
        RuntimeError: no episode completed (nothing to sample) after many env steps.
    """
    cfg, buffer, collector = loop.cfg, loop.buffer, loop.collector
    while len(buffer) < cfg.learning_starts or buffer.num_sampleable < cfg.batch_size:
        step, _ = collector.step()
        buffer.add(loop.encoder(step, policy_version=0))
        if collector.env_steps > 50 * cfg.learning_starts + 100_000:
            raise RuntimeError(f"{name}: no episode completed after {collector.env_steps} env steps; cannot sample")
    for _ in range(cfg.algo.critic_warmup_updates + updates):
        loop.updater.update(buffer.sample(cfg.batch_size, loop.sample_gen))
    _sync(device)


def timed_steps(loop: Loop, steps: int, device: torch.device) -> tuple[Timings, dict[str, float], float]:
    """The body of ``train.py``'s loop for ``steps`` vector steps, one timer per phase.

    Returns:
        (timings, token counts of the updates, acting tokens): the counts are the real prompt (``p``) and candidate
        (``c``) tokens and the candidates (``k``) of the online pass on ``s`` (``on_*``, plus the batch rows
        ``on_b``) and the target pass on ``s'`` over the non-terminal transitions (``tg_*``).
    """
    cfg, buffer, encoder, updater = loop.cfg, loop.buffer, loop.encoder, loop.updater
    updates_per_vector_step = cfg.replay_ratio * cfg.env.num_envs / cfg.batch_size
    t = Timings()
    zero = torch.zeros((), dtype=torch.long, device=device)
    counts = {k: zero.clone() for k in ("on_p", "on_c", "on_k", "on_b", "tg_p", "tg_c", "tg_k")}
    act_tokens0 = loop.actor.tokens.clone()
    credit = 0.0
    batch = None  # as in train.py: each sample overwrites the last batch once its update is done

    def timed(phase: str, fn: Any, *args: Any) -> Any:
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        t.seconds[phase] += time.perf_counter() - t0
        return out

    for _ in range(steps):
        step, episodes = timed("collect", loop.collector.step)
        timed("add", lambda s: buffer.add(encoder(s, policy_version=updater.step)), step)
        t.env_steps += cfg.env.num_envs
        t.episodes += len(episodes)
        t.episode_steps += sum(e.length for e in episodes)
        credit += updates_per_vector_step
        while credit >= 1.0:
            batch = timed("sample", lambda b: buffer.sample(cfg.batch_size, loop.sample_gen, out=b), batch)
            timed("update", updater.update, batch)
            counts["on_p"] += batch.prompt_mask.sum()
            counts["on_c"] += batch.cand_mask.sum()
            counts["on_k"] += batch.cand_mask.any(-1).sum()
            counts["on_b"] += batch.cand_mask.shape[0]
            live = batch.discount > 0  # the target pass scores the non-terminal transitions only
            counts["tg_p"] += (batch.next_prompt_mask & live[:, None]).sum()
            counts["tg_c"] += (batch.next_cand_mask & live[:, None, None]).sum()
            counts["tg_k"] += (batch.next_cand_mask.any(-1) & live[:, None]).sum()
            t.updates += 1
            credit -= 1.0
    n = {k: float(v) for k, v in counts.items()}
    return t, n, float(loop.actor.tokens - act_tokens0)


def result_row(name: str, loop: Loop, t: Timings, n: dict[str, float], act_tokens: float, matmul_n: int,
               device: torch.device) -> dict[str, Any]:
    """One table row from the timings and token counts of :func:`timed_steps` (measures the device's matmul rate)."""
    cfg, model = loop.cfg, loop.model
    total = t.total()
    p_params, c_params = path_params(model)
    head_params = sum(p.numel() for p in loop.agent.heads.parameters())
    flops = update_flops(p_params, c_params, head_params, (n["on_p"], n["on_c"], n["on_k"]),
                         (n["tg_p"], n["tg_c"], n["tg_k"]), n["on_b"])  # fmt: skip
    rate_dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    peak = matmul_rate(device, rate_dtype, matmul_n, repeats=5)
    update_tokens = n["on_p"] + n["on_c"] + n["tg_p"] + n["tg_c"]
    episodes_per_hour = t.episodes / total * 3600 if t.episodes else float("nan")
    return {
        "model": name,
        "grad accum": cfg.algo.grad_accum,
        "trainable": loop.desc["trainable"],
        "env steps/s": t.env_steps / total,
        "updates/s": t.updates / total,
        "scored tok/s": (act_tokens + update_tokens) / total,
        "update tok/s": update_tokens / max(t.seconds["update"], 1e-12),
        "collect %": 100 * t.seconds["collect"] / total,
        "add %": 100 * t.seconds["add"] / total,
        "sample %": 100 * t.seconds["sample"] / total,
        "update %": 100 * t.seconds["update"] / total,
        "update TFLOP/s": flops / max(t.seconds["update"], 1e-12) / 1e12,
        "matmul TFLOP/s": peak / 1e12,
        "MFU %": 100 * flops / max(t.seconds["update"], 1e-12) / peak,
        "episodes/h": episodes_per_hour,
        "mean ep len": t.episode_steps / t.episodes if t.episodes else float("nan"),
        "x 4090 stack": episodes_per_hour / PUBLISHED_4090_EPISODES_PER_HOUR,
        "x H100 stack": episodes_per_hour / PUBLISHED_H100_EPISODES_PER_HOUR,
    }


def bench_model(
    name: str, opts: argparse.Namespace, device: torch.device, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Build the loop for ``name``, fill the buffer, then time ``opts.steps`` vector steps.

    Args:
        name: ``tiny`` or one of :data:`GPU_MODELS`.
        opts: the parsed command line (``overrides``, ``steps``, ``warmup_updates``, ``matmul_n``).
        device: where the model and the buffer live.
        extra: Hydra overrides applied after ``opts.overrides`` (the out-of-memory retry's ``algo.grad_accum``).

    Returns:
        One table row (name -> value).
    """
    cfg = published_config([*opts.overrides, *extra])
    loop = build_loop(name, cfg, device)
    desc = loop.desc
    print(f"[bench] {name}: {desc['params']:,} params ({desc['trainable']:,} trainable, {desc['dtype']}) on "
          f"{device}; {cfg.env.num_envs} envs, batch {cfg.batch_size}, replay ratio {cfg.replay_ratio}",
          file=sys.stderr, flush=True)  # fmt: skip
    warm_up(loop, name, opts.warmup_updates, device)
    t, n, act_tokens = timed_steps(loop, opts.steps, device)
    loop.vec.close()
    row = result_row(name, loop, t, n, act_tokens, opts.matmul_n, device)
    print(f"[bench] {name}: {t.env_steps} env steps, {t.updates} updates, {t.episodes} episodes in {t.total():.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------------------------------
# output


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rows (floats with 3 significant digits, or thousands separators when large)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            if isinstance(v, float):
                cells.append("n/a" if v != v else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}")
            elif isinstance(v, int):
                cells.append(f"{v:,}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse the arguments, run the benchmark for every model, print (and optionally write) the markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (tiny model) or cuda (real-shaped models, bf16)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"tiny and/or {' '.join(GPU_MODELS)} (default: tiny on cpu, the three shapes on cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed vector steps (default 100 cpu, 200 cuda)")
    p.add_argument("--warmup-updates", type=int, default=3, help="untimed updates after the critic warm-up")
    p.add_argument("--matmul-n", type=int, default=None, help="matrix size of the peak-rate matmul")
    p.add_argument("--max-grad-accum", type=int, default=16,
                   help="on out-of-memory, double algo.grad_accum up to this many micro-batches")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="seconds: 4 envs, batch 16, 8 timed steps (the tests)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides of the published config, e.g. env.num_envs=16")
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.models = opts.models or (["tiny"] if device.type == "cpu" else list(GPU_MODELS))
    opts.steps = opts.steps or (100 if device.type == "cpu" else 200)
    opts.matmul_n = opts.matmul_n or (1024 if device.type == "cpu" else 8192)
    if opts.quick:
        opts.steps, opts.warmup_updates, opts.matmul_n = min(opts.steps, 8), 1, min(opts.matmul_n, 256)
        opts.overrides = ["env.num_envs=4", "batch_size=16", "learning_starts=64", "buffer.capacity=4096",
                          "env.corpus_episodes=20", "algo.critic_warmup_updates=2", *opts.overrides]  # fmt: skip
    rows = []
    for name in opts.models:
        accum = published_config(opts.overrides).algo.grad_accum
        while True:
            try:
                rows.append(bench_model(name, opts, device, [f"algo.grad_accum={accum}"]))
                break
            except torch.OutOfMemoryError:
                # The batch of 256 is the published setting; if it does not fit in one pass, keep it and split
                # it into micro-batches (the update is the same), reported in the "grad accum" column.
                if accum * 2 > opts.max_grad_accum:
                    raise
                accum *= 2
                print(f"[bench] {name}: out of memory, retrying with algo.grad_accum={accum}", file=sys.stderr)
            finally:
                gc.collect()  # free the agent, optimizer states and buffer before the next build
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    cfg = published_config(opts.overrides)
    header = (
        f"SAC training throughput on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} "
        f"({torch.get_num_threads()} threads), Playground-Text, {cfg.env.num_envs} envs, batch {cfg.batch_size}, "
        f"replay ratio {cfg.replay_ratio}, {opts.steps} timed vector steps{' (--quick)' if opts.quick else ''}. "
        f"MFU = update model FLOPs / update time / measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul "
        f"rate; episodes/h from the episodes finished in the timed loop (a random-init policy: long episodes); "
        f"x 4090 stack = / {PUBLISHED_4090_EPISODES_PER_HOUR:,.0f} episodes/h, x H100 stack = / "
        f"{PUBLISHED_H100_EPISODES_PER_HOUR:,.0f} episodes per H100-hour."
    )
    table = format_table(rows)
    print(f"\n{header}\n\n{table}")
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(f"{header}\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
