"""Can a model learn BitFlip-Text's decision at all? Supervised learning on correct actions, no RL.

Random (state, goal) pairs of n bits; the loss is -log of the policy mass on the bits that differ (any of them is a
correct move). If this supervised upper bound learns slowly, SAC + HER cannot learn faster: the bottleneck is the
model's representation of the text, not the RL algorithm.

    python scripts/bitflip_supervised_probe.py --hidden 64 --layers 2 --steps 1500 [--bit-words indexed]

Prints a table of (step, loss, greedy accuracy) with the accuracy of a uniform policy as the reference.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gymnasium
import torch

import envs  # noqa: F401 - registers the envs
from sacglam.losses import candidate_policy
from sacglam.models import LoraConfig, ModelConfig, load_model
from sacglam.pipeline import tokenizer_corpus
from sacglam.prompting import PromptCodec, PromptTemplate
from sacglam.scoring import score_candidates

TEMPLATE = "Goal: {goal}\nObservation: {obs}\nAction:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-bits", type=int, default=8)
    parser.add_argument("--bit-words", default="digits", choices=["digits", "indexed"],
                        help="how the env writes bits (see envs/bitflip_text.py)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=250, help="print every this many steps")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)

    n = opts.n_bits
    env = gymnasium.make("sacglam/BitFlipText-v0", n_bits=n, bit_words=opts.bit_words).unwrapped
    cfg = ModelConfig(hidden=opts.hidden, layers=opts.layers, heads=opts.heads, intermediate=2 * opts.hidden,
                      lora=LoraConfig(enabled=False))
    model, tok = load_model(cfg, corpus=tokenizer_corpus(TEMPLATE, env, 50, 0), device="cpu")
    codec = PromptCodec(lambda t: tok.encode(t, add_special_tokens=False), pad_id=tok.pad_token_id,
                        template=PromptTemplate.from_format(TEMPLATE), max_goal_tokens=n + 4, max_obs_tokens=n + 4,
                        max_cands=n, max_cand_tokens=4, bos_id=tok.bos_token_id)
    cand_ids, cand_mask = codec.candidate_tensors([[f"Flip bit {i}" for i in range(1, n + 1)]])
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    gen = torch.Generator().manual_seed(1)

    print(f"model: hidden {opts.hidden}, layers {opts.layers}\n")
    print("| step | loss | greedy accuracy | uniform policy | seconds |")
    print("|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    for step in range(1, opts.steps + 1):
        state = torch.randint(0, 2, (opts.batch, n), generator=gen)
        goal = torch.randint(0, 2, (opts.batch, n), generator=gen)
        goal[(state == goal).all(-1), 0] ^= 1  # the env never starts at its goal
        observations = ["Bits: " + " ".join(map(str, row.tolist())) for row in state]
        goals = ["Make the bits " + " ".join(map(str, row.tolist())) for row in goal]
        prompt_ids, prompt_mask = codec.encode_prompts(goals, observations)
        out = score_candidates(model, prompt_ids, prompt_mask, cand_ids.expand(opts.batch, -1, -1),
                               cand_mask.expand(opts.batch, -1, -1))
        log_pi, pi = candidate_policy(out.logp, out.valid)
        differs = state != goal
        loss = -torch.logsumexp(log_pi.masked_fill(~differs, -1e9), dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % opts.every == 0:
            accuracy = differs.gather(1, pi.argmax(-1, keepdim=True)).float().mean().item()
            uniform = differs.float().mean().item()
            seconds = time.perf_counter() - start
            print(f"| {step} | {loss.item():.3f} | {accuracy:.3f} | {uniform:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
