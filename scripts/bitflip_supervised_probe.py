"""Can a model learn BitFlip-Text's decision at all? Supervised learning on correct actions, no RL.

Random (state, goal) pairs of n bits; the loss is -log of the policy mass on the bits that differ (any of them is a
correct move). If this supervised upper bound learns slowly, SAC + HER cannot learn faster: the bottleneck is the
model's representation of the text, not the RL algorithm.

    python scripts/bitflip_supervised_probe.py --layers 2 --steps 1500 [--bit-words indexed] [--actions set]

Prints a table of (step, loss, greedy accuracy) with the accuracy of a uniform policy as the reference.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import envs  # noqa: F401 - registers the envs
from envs.bitflip_text import GOAL_PREFIX, OBS_PREFIX, BitFlipTextEnv
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
    parser.add_argument("--actions", default="flip", choices=["flip", "set"],
                        help="how the env names actions: 'Flip bit i' or 'Set 3on' (needs --bit-words indexed)")
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
    env = BitFlipTextEnv(n_bits=n, bit_words=opts.bit_words, actions=opts.actions)
    cfg = ModelConfig(hidden=opts.hidden, layers=opts.layers, heads=opts.heads, intermediate=2 * opts.hidden,
                      lora=LoraConfig(enabled=False))
    model, tok = load_model(cfg, corpus=tokenizer_corpus(TEMPLATE, env, 50, 0), device="cpu")
    codec = PromptCodec(lambda t: tok.encode(t, add_special_tokens=False), pad_id=tok.pad_token_id,
                        template=PromptTemplate.from_format(TEMPLATE), max_goal_tokens=n + 4, max_obs_tokens=n + 4,
                        max_cands=n, max_cand_tokens=4, bos_id=tok.bos_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    gen = torch.Generator().manual_seed(1)

    print(f"model: hidden {opts.hidden}, layers {opts.layers}\n")
    print("| step | loss | greedy accuracy | uniform policy | seconds |")
    print("|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    def pairs(size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random (state, goal) pairs [size, n], their policy log-probs [size, n] and the bits that differ."""
        state = torch.randint(0, 2, (size, n), generator=g)
        goal = torch.randint(0, 2, (size, n), generator=g)
        goal[(state == goal).all(-1), 0] ^= 1  # the env never starts at its goal
        observations = [OBS_PREFIX + env.bits_text(row.numpy()) for row in state]  # the env's own words
        goals = [GOAL_PREFIX + env.bits_text(row.numpy()) for row in goal]
        prompt_ids, prompt_mask = codec.encode_prompts(goals, observations)
        cand_ids, cand_mask = codec.candidate_tensors([env.actions_text(row.numpy()) for row in state])  # k: bit k
        out = score_candidates(model, prompt_ids, prompt_mask, cand_ids, cand_mask)
        log_pi, _ = candidate_policy(out.logp, out.valid)
        return state, log_pi, state != goal

    for step in range(1, opts.steps + 1):
        _, log_pi, differs = pairs(opts.batch, gen)
        loss = -torch.logsumexp(log_pi.masked_fill(~differs, -1e9), dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % opts.every == 0:
            with torch.no_grad():  # the same 512 held-out pairs at every report
                _, log_pi, differs = pairs(512, torch.Generator().manual_seed(12345))
            accuracy = differs.gather(1, log_pi.argmax(-1, keepdim=True)).float().mean().item()
            uniform = differs.float().mean().item()
            seconds = time.perf_counter() - start
            print(f"| {step} | {loss.item():.3f} | {accuracy:.3f} | {uniform:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
