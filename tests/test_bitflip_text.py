"""Tests of BitFlip-Text: exact episodes, the step limit, the expert, seeding and errors."""

from __future__ import annotations

import random

import gymnasium
import pytest

import envs  # noqa: F401 - registers the sacglam/ ids
from envs.base import InvalidActionError
from envs.bitflip_text import BitFlipTextEnv


def test_hand_written_episode() -> None:
    env = BitFlipTextEnv(n_bits=4)
    obs, info = env.reset(seed=0, options={"goal": "Make the bits 1 0 1 1"})
    start = obs.removeprefix("Bits: ").split(" ")
    assert obs.startswith("Bits: ") and len(start) == 4 and start != ["1", "0", "1", "1"]
    assert info == {
        "goal": "Make the bits 1 0 1 1",
        "goal_category": "bitflip",
        "admissible_actions": ["Flip bit 1", "Flip bit 2", "Flip bit 3", "Flip bit 4"],
        "achieved_goals": [],
        "invalid_action": False,
    }
    # Bits are 1-based from the left: flipping bit 1 changes the first digit shown.
    bits = [int(b) for b in start]
    bits[0] ^= 1
    want = " ".join(map(str, bits))
    obs, reward, terminated, truncated, info = env.step("Flip bit 1")
    assert obs == f"Bits: {want}" and info["achieved_goals"] == [f"Make the bits {want}"]
    assert (reward, terminated, truncated) == ((1.0, True, False) if want == "1 0 1 1" else (0.0, False, False))


def test_known_start_to_goal() -> None:
    """Find a seed whose start is ``0 0 1 1`` under goal ``1 0 1 1`` and check the one-flip episode exactly."""
    env = BitFlipTextEnv(n_bits=4)
    seed = next(
        s for s in range(1000) if env.reset(seed=s, options={"goal": "Make the bits 1 0 1 1"})[0] == "Bits: 0 0 1 1"
    )
    env.reset(seed=seed, options={"goal": "Make the bits 1 0 1 1"})
    assert env.expert_action() == "Flip bit 1"
    obs, reward, terminated, truncated, info = env.step("Flip bit 4")
    assert (obs, reward, terminated, truncated) == ("Bits: 0 0 1 0", 0.0, False, False)
    assert info["achieved_goals"] == ["Make the bits 0 0 1 0"]
    assert env.expert_action() == "Flip bit 1"
    env.step("Flip bit 1")
    obs, reward, terminated, truncated, info = env.step("Flip bit 4")
    assert (obs, reward, terminated, truncated) == ("Bits: 1 0 1 1", 1.0, True, False)
    assert info["achieved_goals"] == ["Make the bits 1 0 1 1"]


def test_truncation_exactly_at_n_steps() -> None:
    env = BitFlipTextEnv(n_bits=5)
    assert env.goal_step_limit("Make the bits 0 0 0 0 0") == 5
    # Flipping one bit back and forth visits only the start and one neighbour: pick a bit whose flip is not the goal.
    obs, _ = env.reset(seed=0, options={"goal": "Make the bits 0 0 0 0 0"})
    action = "Flip bit 2" if obs == "Bits: 1 0 0 0 0" else "Flip bit 1"
    for t in range(1, 6):
        _, reward, terminated, truncated, _ = env.step(action)
        assert (reward, terminated) == (0.0, False)
        assert truncated is (t == 5), f"step {t}"
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action)


def test_expert_solves_every_episode() -> None:
    env = BitFlipTextEnv(n_bits=8)
    for seed in range(100):
        obs, info = env.reset(seed=seed)
        goal_bits = info["goal"].removeprefix("Make the bits ")
        differing = sum(a != b for a, b in zip(obs.removeprefix("Bits: ").split(), goal_bits.split(), strict=True))
        assert differing >= 1  # the start is never the goal
        for t in range(1, differing + 1):
            obs, reward, terminated, truncated, info = env.step(env.expert_action())
            assert terminated is (t == differing) and not truncated
        assert obs == f"Bits: {goal_bits}" and reward == 1.0


def test_start_differs_from_goal_even_with_one_bit() -> None:
    env = BitFlipTextEnv(n_bits=1)
    for seed in range(50):
        obs, info = env.reset(seed=seed)
        assert obs.removeprefix("Bits: ") != info["goal"].removeprefix("Make the bits ")
        assert env.step("Flip bit 1")[1:3] == (1.0, True)


def test_seeded_runs_are_reproducible() -> None:
    def rollout(seed: int) -> list[tuple[str, dict]]:
        env = BitFlipTextEnv(n_bits=6)
        rng = random.Random(seed)
        trace = []
        for episode in range(5):
            obs, info = env.reset(seed=seed if episode == 0 else None)
            trace.append((obs, info))
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(rng.choice(info["admissible_actions"]))
                trace.append((obs, info))
                done = terminated or truncated
        return trace

    assert rollout(3) == rollout(3)
    assert rollout(3) != rollout(4)


def test_invalid_actions() -> None:
    env = BitFlipTextEnv(n_bits=3)
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match=r"'Flip bit 0'.*\['Flip bit 1', 'Flip bit 2', 'Flip bit 3'\]"):
        env.step("Flip bit 0")
    env = BitFlipTextEnv(n_bits=3, invalid_action="noop")
    obs0, _ = env.reset(seed=0)
    results = [env.step("Flip bit 4") for _ in range(3)]
    assert [r[0] for r in results] == [obs0] * 3
    assert [r[2:4] for r in results] == [(False, False), (False, False), (False, True)]
    assert all(r[4]["invalid_action"] and r[4]["achieved_goals"] == [] for r in results)


def test_goal_errors_and_category() -> None:
    env = BitFlipTextEnv(n_bits=4)
    for bad in ("Make the bits 1 0 1", "Make the bits 1 0 1 2", "make the bits 1 0 1 1", "Make the bits 1 0 1 1 "):
        with pytest.raises(ValueError, match=r"unknown BitFlip-Text goal .*e\.g\. 'Make the bits 1 0 1 0'"):
            env.reset(options={"goal": bad})
    with pytest.raises(ValueError, match="unknown goal category 'grasp'"):
        env.reset(options={"goal_category": "grasp"})
    assert env.goal_category("Make the bits 0 0 0 0") == "bitflip" and env.goal_categories == ["bitflip"]
    with pytest.raises(ValueError, match="n_bits must be >= 1"):
        BitFlipTextEnv(n_bits=0)


def test_gymnasium_make_and_pure_reward() -> None:
    env = gymnasium.make("sacglam/BitFlipText-v0", n_bits=5)
    inner = env.unwrapped
    assert isinstance(inner, BitFlipTextEnv) and inner.n_bits == 5
    obs, info = env.reset(seed=0)
    assert len(obs.removeprefix("Bits: ").split(" ")) == 5 and len(info["admissible_actions"]) == 5
    achieved = ["Make the bits 1 0 1 1 0"]
    assert BitFlipTextEnv.compute_reward(achieved, "Make the bits 1 0 1 1 0") == 1.0
    assert BitFlipTextEnv.compute_reward(achieved, "Make the bits 1 0 1 1 1") == 0.0
    assert achieved == ["Make the bits 1 0 1 1 0"]


def test_indexed_bit_words_same_dynamics() -> None:
    """``bit_words="indexed"``: the same seeded episode as ``digits``, each bit written as ``<i>on`` / ``<i>off``."""
    plain, indexed = BitFlipTextEnv(n_bits=4), BitFlipTextEnv(n_bits=4, bit_words="indexed")
    obs_p, _ = plain.reset(seed=3, options={"goal": "Make the bits 1 0 1 1"})
    obs_i, info = indexed.reset(seed=3, options={"goal": "Make the bits 1on 2off 3on 4on"})
    words = {"0": "off", "1": "on"}
    to_indexed = lambda bits: " ".join(f"{i}{words[b]}" for i, b in enumerate(bits.split(" "), 1))  # noqa: E731
    assert obs_i == "Bits: " + to_indexed(obs_p.removeprefix("Bits: "))
    assert info["goal"] == "Make the bits 1on 2off 3on 4on"
    for _ in range(4):
        action = plain.expert_action()
        assert indexed.expert_action() == action
        obs_p, r_p, term_p, trunc_p, _ = plain.step(action)
        obs_i, r_i, term_i, trunc_i, info = indexed.step(action)
        assert obs_i == "Bits: " + to_indexed(obs_p.removeprefix("Bits: "))
        assert info["achieved_goals"] == ["Make the bits " + to_indexed(obs_p.removeprefix("Bits: "))]
        assert (r_i, term_i, trunc_i) == (r_p, term_p, trunc_p)
        if term_p:
            break
    assert term_i and r_i == 1.0
    with pytest.raises(ValueError, match="bit_words='indexed'"):
        indexed.reset(seed=0, options={"goal": "Make the bits 1 0 1 1"})
    with pytest.raises(ValueError, match="bit_words"):
        BitFlipTextEnv(bit_words="hex")


def test_set_actions_hand_written_episode() -> None:
    """``actions="set"``: each action names the word it writes; the admissible list follows the state."""
    env = BitFlipTextEnv(n_bits=3, bit_words="indexed", actions="set")
    obs, info = env.reset(seed=0, options={"goal": "Make the bits 1on 2off 3on"})
    bits = obs.removeprefix("Bits: ").split(" ")
    flip = {"on": "off", "off": "on"}
    expected = [f"Set {w[0]}{flip[w[1:]]}" for w in bits]  # one per bit, in bit order, each the other word
    assert info["admissible_actions"] == expected
    # A hand-written walk from a known state: 1off 2off 3off -> goal 1on 2off 3on in two moves.
    env._bits[:] = 0
    env._obs = "Bits: 1off 2off 3off"
    assert env.admissible_actions() == ["Set 1on", "Set 2on", "Set 3on"]
    assert env.expert_action() == "Set 1on"
    obs, reward, terminated, truncated, info = env.step("Set 1on")
    assert (obs, reward, terminated, truncated) == ("Bits: 1on 2off 3off", 0.0, False, False)
    assert info["admissible_actions"] == ["Set 1off", "Set 2on", "Set 3on"]
    assert info["achieved_goals"] == ["Make the bits 1on 2off 3off"]
    with pytest.raises(InvalidActionError):
        env.step("Set 1on")  # bit 1 is already on: not admissible
    with pytest.raises(InvalidActionError):
        env.step("Flip bit 3")
    obs, reward, terminated, truncated, info = env.step("Set 3on")
    assert (obs, reward, terminated, truncated) == ("Bits: 1on 2off 3on", 1.0, True, False)


def test_set_actions_same_dynamics_as_flip() -> None:
    """The same seeded episodes (random moves) under ``flip`` and ``set``: identical states, rewards and ends."""
    flip = BitFlipTextEnv(n_bits=6, bit_words="indexed")
    put = BitFlipTextEnv(n_bits=6, bit_words="indexed", actions="set")
    rng = random.Random(0)
    for seed in range(20):
        obs_f, info_f = flip.reset(seed=seed)
        obs_s, info_s = put.reset(seed=seed)
        assert (obs_s, info_s["goal"]) == (obs_f, info_f["goal"])
        done = False
        while not done:
            k = rng.randrange(6)
            obs_f, r_f, term_f, trunc_f, info_f = flip.step(info_f["admissible_actions"][k])
            obs_s, r_s, term_s, trunc_s, info_s = put.step(info_s["admissible_actions"][k])
            assert (obs_s, r_s, term_s, trunc_s) == (obs_f, r_f, term_f, trunc_f)
            assert info_s["achieved_goals"] == info_f["achieved_goals"]
            done = term_f or trunc_f


def test_set_actions_expert_and_errors() -> None:
    env = BitFlipTextEnv(n_bits=8, bit_words="indexed", actions="set")
    for seed in range(20):
        _, info = env.reset(seed=seed)
        goal_words = set(info["goal"].removeprefix("Make the bits ").split(" "))
        terminated = False
        while not terminated:
            action = env.expert_action()
            assert action.removeprefix("Set ") in goal_words  # a correct move writes a goal word
            _, _, terminated, truncated, info = env.step(action)
            assert not truncated
    with pytest.raises(ValueError, match="needs bit_words='indexed'"):
        BitFlipTextEnv(actions="set")
    with pytest.raises(ValueError, match="actions must be one of"):
        BitFlipTextEnv(bit_words="indexed", actions="toggle")
