"""Benchmark: ReplayBuffer add/sample throughput against Stable-Baselines3's HerReplayBuffer, measured in the same run.

Both buffers get the same goal-conditioned dataset: N envs, episodes of ``--episode-len`` steps, 128-token
observations, 16 candidates of 8 tokens (for SB3: one flat observation vector holding the observation and candidate
tokens), a goal achieved with probability 0.2 per step out of 64 goals. HER: strategy ``future``, ratio 0.8 (SB3:
``n_sampled_goal=4``). Prints a markdown table, the ratios against SB3, and bytes per transition.

    python scripts/bench_buffer.py                 # capacity 500k, batch 256, int16 tokens, 1 thread and all threads
    python scripts/bench_buffer.py --quick         # small capacity, seconds
    python scripts/bench_buffer.py --device cuda   # our buffer on the GPU (SB3 samples to the GPU too)
    python scripts/bench_buffer.py --all-configs   # int32/int16 x native/torch sampler, one table
    python scripts/bench_buffer.py --sampler torch --threads 1   # the torch-op sampling path (buffer.native=off)
    python scripts/bench_buffer.py --rarity-draws 4 --rare-fraction 0.25   # the training default HER
    python scripts/bench_buffer.py --passes        # also: where a native sample call goes, pass by pass

All buffers are built first; then every sampler (each configuration of ours, with a new batch per call and with
``out=`` reusing the last one, at each ``--threads`` count, and SB3) is timed in ``--rounds`` interleaved rounds of
chunks of ``--chunk`` calls, and a rate is the median over its chunks. A drift of a shared machine then hits every
row alike, and the ratios against SB3 compare like with like. SB3 samples on one thread (numpy) whatever
``--threads`` says; our native sampler splits a batch over torch's intra-op threads.

On a CPU our buffer samples with the native C sampler (``buffer.native``, sacglam/replay/csrc/sample.c; ``--sampler
torch``
measures the ~100-op torch path it replaces). At capacity 500k both buffers are then bound by random reads of ~1-2 KB
of token rows per transition, and ours also by writing ~2.6 KB of int32 ids and bool masks per transition (4.8 KB
while batches held int64 ids, until 2026-12-07); int16 tokens halve the bytes read. ``--sampler compiled``
(BufferConfig.compile) is slower than eager on CPU: its generated kernel gathers token by token.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sacglam.prompting import PromptPieces
from sacglam.replay import clib
from sacglam.replay.buffer import BufferConfig, ReplayBuffer
from sacglam.replay.her import HERConfig
from sacglam.types import Batch, TransitionBatch

LO, K, LC, G, N_GOALS, VOCAB = 128, 16, 8, 2, 64, 30000


def make_batches(n_envs: int, n_pool: int, seed: int) -> list[dict[str, np.ndarray]]:
    """A pool of random per-step arrays (reused cyclically) so data generation is not timed."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n_pool):
        ach = np.where(rng.random(n_envs) < 0.2, rng.integers(0, N_GOALS, n_envs), -1)
        pool.append({
            "obs": rng.integers(1, VOCAB, (n_envs, LO)), "next_obs": rng.integers(1, VOCAB, (n_envs, LO)),
            "cands": rng.integers(1, VOCAB, (n_envs, K, LC)), "next_cands": rng.integers(1, VOCAB, (n_envs, K, LC)),
            "goal": rng.integers(0, N_GOALS, n_envs), "action": rng.integers(0, K, n_envs), "achieved": ach,
        })
    return pool


def chunk_rate(sample: Callable[[], object], batch: int, chunk: int, dev: torch.device) -> float:
    """Sampled transitions per second over ``chunk`` calls."""
    t0 = time.perf_counter()
    for _ in range(chunk):
        sample()
    _sync(dev)
    return chunk * batch / (time.perf_counter() - t0)


def build_ours(args: argparse.Namespace, pool: list[dict[str, np.ndarray]], token_dtype: str,
               sampler: str) -> tuple[ReplayBuffer, dict[str, float]]:
    """Our buffer filled to capacity from ``pool``, and its add rate and bytes per transition."""
    dev = torch.device(args.device)
    compile = sampler == "compiled"
    native = "on" if sampler == "native" else "off"
    cfg = BufferConfig(capacity=args.capacity, n_step=args.n_step, gamma=0.99, device=str(dev), max_obs_tokens=LO,
                       max_goal_tokens=4, max_cands=K, max_cand_tokens=LC, max_goals=N_GOALS, max_achieved=G,
                       token_dtype=token_dtype, compile=compile, native=native,
                       her=HERConfig("future", 0.8, rarity_draws=args.rarity_draws, rare_fraction=args.rare_fraction))
    pieces = PromptPieces(torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7]), pad_id=0)
    buf = ReplayBuffer(cfg, args.n_envs, pad_id=0, prompt=pieces)
    for g in range(N_GOALS):
        buf.register_goal([100 + g, 200 + g], limit=args.episode_len)
    N = args.n_envs
    tbs = []
    for p in pool:
        ach = torch.full((N, G), -1, dtype=torch.long)
        ach[:, 0] = torch.from_numpy(p["achieved"])
        tbs.append(TransitionBatch(
            obs=torch.from_numpy(p["obs"]).to(dev), obs_len=torch.full((N,), LO, device=dev),
            next_obs=torch.from_numpy(p["next_obs"]).to(dev), next_obs_len=torch.full((N,), LO, device=dev),
            cands=torch.from_numpy(p["cands"]).to(dev), cand_len=torch.full((N, K), LC, device=dev),
            next_cands=torch.from_numpy(p["next_cands"]).to(dev), next_cand_len=torch.full((N, K), LC, device=dev),
            goal=torch.from_numpy(p["goal"]).to(dev), action=torch.from_numpy(p["action"]).to(dev),
            reward=torch.zeros(N, device=dev), terminated=torch.zeros(N, dtype=torch.bool, device=dev),
            truncated=torch.zeros(N, dtype=torch.bool, device=dev), achieved=ach.to(dev),
            logp=torch.zeros(N, device=dev), policy_version=torch.zeros(N, dtype=torch.long, device=dev),
        ))
    n_adds = args.capacity // N
    trunc_true = torch.ones(N, dtype=torch.bool, device=dev)
    trunc_false = torch.zeros(N, dtype=torch.bool, device=dev)
    t0 = time.perf_counter()
    for i in range(n_adds):
        tb = tbs[i % len(tbs)]
        tb.truncated = trunc_true if i % args.episode_len == args.episode_len - 1 else trunc_false
        buf.add(tb)
    _sync(dev)
    t_add = time.perf_counter() - t0
    return buf, {"add": n_adds * N / t_add, "bytes": buf.bytes_per_transition()}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build_sb3(args: argparse.Namespace, pool: list[dict[str, np.ndarray]]) -> tuple[Any, dict[str, float]]:
    """SB3's HerReplayBuffer filled with the same data, and its add rate and bytes per transition."""
    import gymnasium as gym
    from gymnasium import spaces
    from stable_baselines3 import HerReplayBuffer
    from stable_baselines3.common.vec_env import DummyVecEnv

    width = LO + K * LC  # observation tokens and candidate tokens in one flat vector

    class GoalEnv(gym.Env):
        observation_space = spaces.Dict({
            "observation": spaces.Box(0, VOCAB, (width,), np.int32),
            "achieved_goal": spaces.Box(-1, N_GOALS, (1,), np.int32),
            "desired_goal": spaces.Box(0, N_GOALS, (1,), np.int32),
        })
        action_space = spaces.Discrete(K)

        def compute_reward(self, achieved: np.ndarray, desired: np.ndarray, info: Any) -> np.ndarray:
            return (achieved == desired).all(-1).astype(np.float32)

    vec = DummyVecEnv([GoalEnv for _ in range(args.n_envs)])
    buf = HerReplayBuffer(args.capacity, GoalEnv.observation_space, GoalEnv.action_space, vec, device=args.device,
                          n_envs=args.n_envs, n_sampled_goal=4, goal_selection_strategy="future")
    N = args.n_envs
    dicts = []
    for p in pool:
        obs = {"observation": np.concatenate([p["obs"], p["cands"].reshape(N, -1)], 1).astype(np.int32),
               "achieved_goal": p["achieved"].reshape(N, 1).astype(np.int32),
               "desired_goal": p["goal"].reshape(N, 1).astype(np.int32)}
        nxt = {"observation": np.concatenate([p["next_obs"], p["next_cands"].reshape(N, -1)], 1).astype(np.int32),
               "achieved_goal": obs["achieved_goal"], "desired_goal": obs["desired_goal"]}
        dicts.append((obs, nxt, p["action"].reshape(N, 1)))
    n_adds = args.capacity // N
    reward = np.zeros(N, np.float32)
    infos_end = [{"TimeLimit.truncated": True} for _ in range(N)]
    infos_mid: list[dict[str, Any]] = [{} for _ in range(N)]
    t0 = time.perf_counter()
    for i in range(n_adds):
        obs, nxt, act = dicts[i % len(dicts)]
        end = i % args.episode_len == args.episode_len - 1
        buf.add(obs, nxt, act, reward, np.full(N, end), infos_end if end else infos_mid)
    t_add = time.perf_counter() - t0
    per = sum(v.nbytes for v in buf.observations.values()) + sum(v.nbytes for v in buf.next_observations.values())
    per += buf.actions.nbytes + buf.rewards.nbytes + buf.dones.nbytes + buf.timeouts.nbytes
    return buf, {"add": n_adds * N / t_add, "bytes": per / args.capacity}


def pass_table(args: argparse.Namespace, buf: ReplayBuffer, batch: Batch) -> None:
    """Where one ``sample(out=)`` call of the native sampler goes, on 1 thread: its passes from a timing build of the C
    file (clock reads between passes, ``-DSACGLAM_TIMING``) and the Python around the call; medians over chunks."""
    lib = clib.load(timing=True)
    if lib is None or buf._native is None:
        print(f"\n(no pass table: the native sampler is not in use here {clib.load_error()})")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    buf._native = lib  # the same arguments; this build also sums the time of each pass
    acc = (ctypes.c_double * 5).in_dll(lib, "sacglam_pass_us")
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.chunk):
        buf.sample(args.batch, gen, out=batch)
    parts: list[list[float]] = []
    for _ in range(args.rounds):
        for i in range(5):
            acc[i] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.chunk):
            buf.sample(args.batch, gen, out=batch)
        call = (time.perf_counter() - t0) * 1e6 / args.chunk
        passes = [acc[i] / acc[4] for i in range(4)]
        parts.append([*passes, call - sum(passes), call])
    torch.set_num_threads(threads)
    med = np.median(np.array(parts), 0)
    names = ["A: sampled rows (column search; their scalar rows prefetched)",
             "B0: prefetch episode, window and HER source rows",
             "B: token rows prefetched (A2), scalars (HER, rewards, n-step)",
             "C: token copies (both prompts and candidate sets, masks)",
             "Python around the C call (uniform draws, out= check, pointers)", "whole sample(out=) call"]
    print(f"\nOne sample(out=) call of {args.batch} on 1 thread, {buf.cfg.token_dtype} buffer above, timing build; "
          f"medians over {args.rounds} chunks of {args.chunk} calls\n")
    print("| part | us per call | share |\n|---|---:|---:|")
    for name, us in zip(names, med, strict=True):
        print(f"| {name} | {us:.1f} | {us / med[-1]:.0%} |")


def thread_counts(spec: str) -> list[int]:
    """``--threads``: a comma list of counts, ``all`` = torch's default (the machine's cores)."""
    default = torch.get_num_threads()
    counts = [default if x.strip() == "all" else int(x) for x in spec.split(",")]
    return list(dict.fromkeys(c for c in counts if c > 0))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick`` applied: capacity 4096, 3 rounds)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=500_000)
    ap.add_argument("--n-envs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-step", type=int, default=1)
    ap.add_argument("--episode-len", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds; each times one chunk of every sampler")
    ap.add_argument("--chunk", type=int, default=10, help="calls per timed chunk (a rate is its chunks' median)")
    ap.add_argument("--token-dtype", default="int16", choices=["int16", "int32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1,all",
                    help="torch thread counts to time our sampler at, comma separated ('all' = torch's default)")
    ap.add_argument("--quick", action="store_true", help="capacity 4096, 3 rounds")
    ap.add_argument("--skip-sb3", action="store_true")
    ap.add_argument("--sampler", default="auto", choices=["auto", "native", "torch", "compiled"],
                    help="our sampling path: native C (CPU), torch ops, or torch.compile'd ops; auto = native on CPU")
    ap.add_argument("--rarity-draws", type=int, default=1, help="her.rarity_draws (the training default is 4)")
    ap.add_argument("--rare-fraction", type=float, default=0.0, help="her.rare_fraction (the training default: 0.25)")
    ap.add_argument("--passes", action="store_true",
                    help="also time the native sampler's passes (a timing build of sample.c) and the Python around it")
    ap.add_argument("--all-configs", action="store_true",
                    help="our buffer with int32/int16 tokens and native/torch samplers, against SB3, in one table")
    args = ap.parse_args(argv)
    if args.quick:
        args.capacity, args.rounds = 4096, 3
    return args


# (row dict, its key, torch threads, the call): one sampler timed in every round; the median rate goes to row[key]
Timed = tuple[dict[str, float], str, int, Callable[[], object]]
Row = tuple[str, int, dict[str, float]]  # (buffer name, threads, rates and bytes)


def build_all(args: argparse.Namespace, threads: list[int], dev: torch.device
              ) -> tuple[list[Row], tuple[ReplayBuffer, Batch] | None, list[Timed], dict[str, float] | None]:
    """Build every buffer first (adds timed on torch's default threads), each warmed up by a few samples.

    Returns:
        (rows, first, timed, ref): one table row per (our config, thread count); our first buffer and a batch of
        it (for ``--passes``); the samplers to time; SB3's row (None with ``--skip-sb3``).
    """
    pool = make_batches(args.n_envs, 32, seed=0)
    sampler = args.sampler if args.sampler != "auto" else ("native" if args.device == "cpu" else "torch")
    configs = ([(dt, c) for c in ("native", "torch") for dt in ("int32", "int16")] if args.all_configs
               else [(args.token_dtype, sampler)])
    rows: list[Row] = []
    first: tuple[ReplayBuffer, Batch] | None = None
    timed: list[Timed] = []
    for dt, c in configs:
        buf, stats = build_ours(args, pool, dt, c)
        gen = torch.Generator(device=dev).manual_seed(0)
        t0 = time.perf_counter()
        batch = buf.sample(args.batch, gen)  # warm-up: the native library's first load, the one-off compile
        first = first or (buf, batch)
        for _ in range(2):
            buf.sample(args.batch, gen)
        _sync(dev)
        print(f"built {dt}/{c}: add {stats['add']:,.0f}/s, warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        for t in threads:
            r = dict(stats)
            rows.append((f"sacglam ReplayBuffer ({dt}, {c} sampler)", t, r))
            timed.append((r, "sample", t, functools.partial(buf.sample, args.batch, gen)))
            timed.append((r, "sample_out", t, functools.partial(buf.sample, args.batch, gen, out=batch)))
    ref = None
    if not args.skip_sb3:
        sb3, ref = build_sb3(args, pool)
        for _ in range(3):
            sb3.sample(args.batch)
        print(f"built SB3: add {ref['add']:,.0f}/s", flush=True)
        timed.append((ref, "sample", 1, functools.partial(sb3.sample, args.batch)))
    return rows, first, timed, ref


def time_interleaved(timed: list[Timed], args: argparse.Namespace, dev: torch.device) -> None:
    """Time every sampler in ``args.rounds`` interleaved rounds; each row gets its chunks' median rate."""
    default_threads = torch.get_num_threads()
    rates: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for r, key, t, fn in timed:
            torch.set_num_threads(t)
            rates.setdefault((id(r), key), []).append(chunk_rate(fn, args.batch, args.chunk, dev))
    torch.set_num_threads(default_threads)
    for r, key, _, _ in timed:
        r[key] = float(np.median(rates[(id(r), key)]))


def print_table(args: argparse.Namespace, rows: list[Row], ref: dict[str, float] | None) -> None:
    """The markdown table of every buffer's rates and sizes, against SB3 where it was timed."""
    print(f"\ncapacity {args.capacity}, {args.n_envs} envs, batch {args.batch}, n_step {args.n_step}, "
          f"obs {LO} tokens, {K} candidates x {LC} tokens, device {args.device}, HER future 0.8 "
          f"(rarity draws {args.rarity_draws}, rare fraction {args.rare_fraction}); {args.rounds} interleaved rounds "
          f"of {args.chunk} calls; rates are medians over chunks; SB3 samples on 1 thread\n")
    print("| buffer | threads | add (transitions/s) | sample (transitions/s) | vs SB3 | sample into `out=` | vs SB3 | "
          "bytes/transition | total for capacity |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    def vs(rate: float) -> str:
        return f"{rate / ref['sample']:.1f}x" if ref else ""

    for name, t, r in rows + ([("SB3 HerReplayBuffer", 1, ref)] if ref else []):
        reused = f"{r['sample_out']:,.0f} | {vs(r['sample_out'])}" if "sample_out" in r else " | "
        print(f"| {name} | {t} | {r['add']:,.0f} | {r['sample']:,.0f} | {vs(r['sample'])} | {reused} | "
              f"{r['bytes']:,.0f} | {r['bytes'] * args.capacity / 2**30:.2f} GiB |")


def main() -> None:
    """Build the buffers, time their samplers interleaved, print the table (and the ratio to SB3)."""
    args = parse_args()
    threads = thread_counts(args.threads)
    dev = torch.device(args.device)
    rows, first, timed, ref = build_all(args, threads, dev)
    time_interleaved(timed, args, dev)
    print_table(args, rows, ref)
    if args.passes and first is not None:
        pass_table(args, *first)
    if ref:
        mine = rows[0][2]
        print(f"\nratio (first row / SB3): add {mine['add'] / ref['add']:.2f}x, "
              f"sample {mine['sample'] / ref['sample']:.1f}x, "
              f"sample into out= {mine['sample_out'] / ref['sample']:.1f}x, bytes {mine['bytes'] / ref['bytes']:.2f}x")

if __name__ == "__main__":
    main()
