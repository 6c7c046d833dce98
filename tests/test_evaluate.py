"""evaluate(): exact success rates for scripted policies, determinism, same numbers from env lists and vectors."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from sacglam.evaluate import evaluate
from sacglam.types import ActFn, ActOutput
from tests.test_collector import CountEnv, MiniSyncVec

CATS = ["near", "far"]


def _pick(rule: str) -> ActFn:
    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        assert torch.is_inference_mode_enabled()
        idx = []
        for g, o, c in zip(goals, observations, candidates, strict=True):
            if rule == "correct":
                idx.append(0)  # "go p+1": reaches any "Reach k" in k steps, within its limit k + 1
            elif rule == "wrong":
                idx.append(1)  # "stay": never achieves anything
            elif rule == "near_only":
                idx.append(0 if g == "Reach 1" else 1)
            else:  # "hash": deterministic but state-dependent, so different goals get different outcomes
                idx.append(zlib.crc32(f"{g}|{o}".encode()) % len(c))
        return ActOutput(action=torch.tensor(idx), logp=torch.zeros(len(idx)))

    return act


def _sampler(seed: int) -> ActFn:
    gen = torch.Generator().manual_seed(seed)

    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        idx = [int(torch.randint(len(c), (1,), generator=gen)) for c in candidates]
        return ActOutput(action=torch.tensor(idx), logp=torch.zeros(len(idx)))

    return act


def _fns(n: int) -> list[Any]:
    return [CountEnv for _ in range(n)]


def test_always_correct_and_always_wrong() -> None:
    good = evaluate(_fns(3), _pick("correct"), categories=CATS, episodes_per_category=5, seed=100)
    assert good["eval/greedy/success/near"] == 1.0
    assert good["eval/greedy/success/far"] == 1.0
    assert good["eval/greedy/success"] == 1.0
    assert good["eval/greedy/length/near"] == 1.0  # "Reach 1" takes one step
    assert good["eval/greedy/return/near"] == 1.0
    assert not any(k.startswith("eval/sample/") for k in good)

    bad = evaluate(_fns(3), _pick("wrong"), categories=CATS, episodes_per_category=5, seed=100)
    assert bad["eval/greedy/success/near"] == 0.0
    assert bad["eval/greedy/success/far"] == 0.0
    assert bad["eval/greedy/length/near"] == 2.0  # truncated at the limit k + 1 = 2
    assert bad["eval/greedy/return/far"] == 0.0
    # Far goals are "Reach 2" (limit 3) or "Reach 3" (limit 4): when staying, the length is the limit, and the
    # correct policy takes exactly one step less -- on the very same episodes.
    assert bad["eval/greedy/length/far"] == good["eval/greedy/length/far"] + 1
    assert good["eval/greedy/length/far"] in {2.0 + k / 5 for k in range(6)}


def test_per_category_rates_and_sample_mode() -> None:
    m = evaluate(_fns(2), _pick("near_only"), _pick("wrong"), categories=CATS, episodes_per_category=4, seed=0)
    assert m["eval/greedy/success/near"] == 1.0
    assert m["eval/greedy/success/far"] == 0.0
    assert m["eval/greedy/success"] == 0.5
    assert m["eval/sample/success/near"] == 0.0
    assert m["eval/sample/success"] == 0.0
    assert m["eval/sample/length/near"] == 2.0


def test_deterministic_and_independent_of_env_count() -> None:
    kw: dict[str, Any] = {"categories": CATS, "episodes_per_category": 7, "seed": 1234}
    a = evaluate(_fns(1), _pick("hash"), _sampler(0), **kw)
    b = evaluate(_fns(1), _pick("hash"), _sampler(0), **kw)
    assert a == b
    # Episode j always uses seed + j, so greedy results do not depend on how many envs run them.
    c = evaluate(_fns(3), _pick("hash"), **kw)
    greedy_a = {k: v for k, v in a.items() if k.startswith("eval/greedy/")}
    assert greedy_a == c
    # The hashed policy succeeds on some goals and not others, so the equalities above are not trivial.
    assert 0.0 < a["eval/greedy/success"] < 1.0
    assert evaluate(_fns(1), _pick("hash"), **{**kw, "seed": 99}) != greedy_a


def test_vector_env_gives_same_numbers() -> None:
    kw: dict[str, Any] = {"categories": CATS, "episodes_per_category": 5, "seed": 1234}
    from_fns = evaluate(_fns(1), _pick("hash"), **kw)
    # 3 envs for 10 episodes: the last wave runs 1 episode while 2 envs idle (and auto-reset) and are ignored.
    from_vec = evaluate(MiniSyncVec([CountEnv() for _ in range(3)]), _pick("hash"), **kw)
    assert from_vec == from_fns


def test_vector_env_of_envs_package() -> None:
    vector = pytest.importorskip("envs.vector")
    kw: dict[str, Any] = {"categories": CATS, "episodes_per_category": 5, "seed": 1234}
    vec = vector.SyncVectorTextEnv([CountEnv, CountEnv])
    assert evaluate(vec, _pick("hash"), **kw) == evaluate(_fns(1), _pick("hash"), **kw)
    vec.close()


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least one goal category"):
        evaluate(_fns(1), _pick("correct"), categories=[], episodes_per_category=1, seed=0)
    with pytest.raises(ValueError, match="episodes_per_category"):
        evaluate(_fns(1), _pick("correct"), categories=CATS, episodes_per_category=0, seed=0)

    class IgnoresCategory(CountEnv):
        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            return super().reset(seed=seed)

    with pytest.raises(ValueError, match="must honour the goal_category option"):
        evaluate([IgnoresCategory], _pick("correct"), categories=["far"], episodes_per_category=1, seed=0)

    class Endless(CountEnv):
        def goal_step_limit(self, goal: str) -> int | None:
            return 10**9

    with pytest.raises(RuntimeError, match="did not end within max_steps=5"):
        evaluate([Endless], _pick("wrong"), categories=["near"], episodes_per_category=1, seed=0, max_steps=5)


def _bitflip_act(correct: bool) -> ActFn:
    """Reads the bits from the text: flips the first wrong bit (correct) or a right one (wrong; never reaches the
    goal within n steps: from distance n it can only go to n - 1 and back)."""

    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        idx = []
        for g, o, c in zip(goals, observations, candidates, strict=True):
            want = g.removeprefix("Make the bits ").split()
            have = o.removeprefix("Bits: ").split()
            diff = [w != h for w, h in zip(want, have, strict=True)]
            target = diff.index(True) if correct else (diff.index(False) if False in diff else 0)
            idx.append(c.index(f"Flip bit {target + 1}"))
        return ActOutput(action=torch.tensor(idx), logp=torch.zeros(len(idx)))

    return act


def test_bitflip_text_scripted_policies() -> None:
    vector = pytest.importorskip("envs.vector")
    pytest.importorskip("envs.bitflip_text")
    kw: dict[str, Any] = {"categories": ["bitflip"], "episodes_per_category": 10, "seed": 50}
    vec = vector.make_vector_env("sacglam/BitFlipText-v0", 3, env_kwargs={"n_bits": 4})
    good = evaluate(vec, _bitflip_act(True), _bitflip_act(False), **kw)
    vec.close()
    assert good["eval/greedy/success/bitflip"] == 1.0 and good["eval/greedy/success"] == 1.0
    assert good["eval/sample/success/bitflip"] == 0.0
    assert good["eval/sample/length/bitflip"] == 4.0  # always truncated at n_bits
    # The correct policy needs exactly the Hamming distance of episode j's start (env seed 50 + j) to its goal.
    from envs.bitflip_text import BitFlipTextEnv

    dist = []
    for j in range(10):
        obs, info = BitFlipTextEnv(n_bits=4).reset(seed=50 + j, options={"goal_category": "bitflip"})
        want, have = info["goal"].split()[-4:], obs.split()[-4:]
        dist.append(sum(w != h for w, h in zip(want, have, strict=True)))
    assert good["eval/greedy/length/bitflip"] == pytest.approx(sum(dist) / 10)
