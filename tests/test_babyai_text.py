"""BabyAI-Text: exact sentences, achieved goals, the reward formula, seeding, goal options and the BabyAIBot expert."""

from __future__ import annotations

import numpy as np
import pytest

from envs.babyai_text import ACTIONS, BabyAITextEnv, describe_view, mission_category
from envs.base import InvalidActionError

# Encoded object ids / colours of minigrid (OBJECT_TO_IDX, COLOR_TO_IDX), written out so the test spells its view.
EMPTY, WALL, DOOR, KEY, BALL, BOX = 1, 2, 4, 5, 6, 7
RED, GREEN, BLUE, PURPLE, GREY = 0, 1, 2, 3, 5
OPEN, CLOSED, LOCKED = 0, 1, 2


def _view() -> np.ndarray:
    """A 7x7 view, all empty floor; the agent stands at (3, 6) facing decreasing y."""
    image = np.zeros((7, 7, 3), dtype=np.uint8)
    image[:, :, 0] = EMPTY
    return image


def test_describe_view_exact_sentences() -> None:
    image = _view()
    image[3, 4] = (WALL, GREY, 0)  # 2 steps forward
    image[0, 6] = (WALL, GREY, 0)  # 3 steps left (on the agent's row)
    image[2, 4] = (KEY, PURPLE, 0)  # 1 left, 2 forward
    image[4, 0] = (BALL, GREEN, 0)  # 1 right, 6 forward
    image[5, 6] = (DOOR, RED, LOCKED)  # 2 right: it hides no wall, and is described as a door
    image[1, 2] = (DOOR, BLUE, OPEN)  # 2 left, 4 forward
    image[3, 6] = (BALL, BLUE, 0)  # the agent's own cell holds what it carries: never described as seen
    assert describe_view(image, carrying=("blue", "ball")) == [
        "You carry a blue ball",
        "You see a wall 2 steps forward",
        "You see a wall 3 steps left",
        "You see an open blue door 2 steps left and 4 steps forward",
        "You see a purple key 1 step left and 2 steps forward",
        "You see a green ball 1 step right and 6 steps forward",
        "You see a locked red door 2 steps right",
    ]


def test_describe_view_wall_hidden_by_object_and_unseen_cells() -> None:
    image = _view()
    image[3, 2] = (WALL, GREY, 0)
    image[3, 5] = (BOX, RED, 0)  # between the agent and the wall ahead: GLAM names the box, not the wall
    image[0:3, 6, 0] = 0  # unseen to the left: nothing to say
    image[6, 6] = (WALL, GREY, 0)
    assert describe_view(image) == ["You see a wall 3 steps right", "You see a red box 1 step forward"]


def test_mission_categories() -> None:
    assert mission_category("go to the red ball") == "go_to"
    assert mission_category("pick up a blue key on your left") == "pick_up"
    assert mission_category("open the door in front of you") == "open"
    assert mission_category("put the red ball next to the green box") == "put_next"
    assert mission_category("pick up a key and go to the red ball") == "sequence"
    with pytest.raises(ValueError, match="fly to the moon"):
        mission_category("fly to the moon")


def _clear_room(env: BabyAITextEnv) -> object:
    """Empty the 8x8 room's interior and stand the agent at (3, 3) facing up; returns the minigrid env."""
    inner = env._env  # the minigrid env of the episode (white-box: we build an exact situation)
    for x in range(1, inner.width - 1):
        for y in range(1, inner.height - 1):
            inner.grid.set(x, y, None)
    inner.agent_pos, inner.agent_dir = (3, 3), 3
    return inner


def test_constructed_situation_sentences_and_achieved_goals() -> None:
    from minigrid.core.world_object import Key

    env = BabyAITextEnv("BabyAI-GoToLocal-v0")
    env.reset(seed=3)
    inner = _clear_room(env)
    # The mission's target must not sit where we will face, or minigrid would (rightly) report success.
    assert all(tuple(p) != (2, 1) for p in inner.instrs.desc.obj_poss)  # type: ignore[attr-defined]
    inner.grid.set(2, 1, Key("purple"))  # type: ignore[attr-defined]
    obs, reward, terminated, _, info = env.step("drop")  # empty hands: a step that changes nothing
    assert obs == (
        "You see a wall 3 steps forward, You see a wall 3 steps left, "
        "You see a purple key 1 step left and 2 steps forward"
    )
    assert info["achieved_goals"] == [] and reward == 0.0 and not terminated
    env.step("go forward")
    env.step("go forward")  # at (3, 1): the key is now directly to the left
    obs, _, _, _, info = env.step("turn left")
    assert info["achieved_goals"] == ["go to the purple key"]
    assert obs == "You see a wall 1 step right, You see a purple key 1 step forward"  # facing west: north is right
    _, _, _, _, info = env.step("toggle")  # still facing the same key: not *newly* reached
    assert info["achieved_goals"] == []
    obs, _, _, _, info = env.step("pick up")
    assert info["achieved_goals"] == ["pick up the purple key"]
    assert obs == "You carry a purple key, You see a wall 3 steps forward, You see a wall 1 step right"
    assert env.compute_reward(info["achieved_goals"], "pick up the purple key") == 1.0
    assert env.compute_reward(info["achieved_goals"], "go to the purple key") == 0.0


def test_open_door_achieved_goal() -> None:
    env = BabyAITextEnv("BabyAI-OpenDoorLoc-v0")
    env.reset(seed=0)
    opened = []
    for _ in range(env.goal_step_limit(env.mission) or 0):
        _, _, terminated, truncated, info = env.step(env.expert_action())
        opened += [g for g in info["achieved_goals"] if g.startswith("open the ") and g.endswith(" door")]
        if terminated or truncated:
            break
    assert terminated and len(opened) == 1
    assert info["goal"] in info["achieved_goals"]  # the mission itself is achieved on the success step


def test_reward_formula_exact() -> None:
    env = BabyAITextEnv("BabyAI-GoToLocal-v0", reward_scale=20.0)
    _, info = env.reset(seed=5)
    t_max = 64  # GoToLocal: an 8x8 room, minigrid's max_steps = room_size ** 2
    assert env.goal_step_limit(info["goal"]) == t_max
    rewards = []
    terminated = False
    while not terminated:
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        rewards.append(reward)
        assert not truncated
    t = len(rewards)
    assert info["step"] == t
    assert rewards[:-1] == [0.0] * (t - 1)
    assert rewards[-1] == pytest.approx(20.0 * (1 - 0.9 * t / t_max), abs=1e-9)


def _rollout(env: BabyAITextEnv, seed: int, n: int) -> list[str]:
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    out = [obs]
    for _ in range(n):
        obs, _, terminated, truncated, _ = env.step(ACTIONS[int(rng.integers(len(ACTIONS)))])
        out.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
            out.append(obs)
    return out


def test_same_seed_same_observations() -> None:
    a = _rollout(BabyAITextEnv("BabyAI-GoToLocal-v0"), seed=7, n=150)
    b = _rollout(BabyAITextEnv("BabyAI-GoToLocal-v0"), seed=7, n=150)
    c = _rollout(BabyAITextEnv("BabyAI-GoToLocal-v0"), seed=8, n=150)
    assert a == b
    assert a != c


@pytest.mark.parametrize("level", ["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"])
def test_expert_solves_every_seeded_episode(level: str) -> None:
    env = BabyAITextEnv(level)
    solved = 0
    for seed in range(25):
        _, info = env.reset(seed=seed)
        while True:
            _, reward, terminated, truncated, info = env.step(env.expert_action())
            if terminated or truncated:
                break
        solved += int(terminated and reward > 0 and info["goal"] in info["achieved_goals"])
    assert solved == 25


def test_expert_recovers_after_deviation() -> None:
    env = BabyAITextEnv("BabyAI-PickupLoc-v0")
    solved = 0
    for seed in range(10):
        env.reset(seed=seed)
        env.expert_action()
        env.step("turn right")  # whatever the bot said, a detour
        env.step("turn right")
        while True:
            _, reward, terminated, truncated, _ = env.step(env.expert_action())
            if terminated or truncated:
                break
        solved += int(reward > 0)
    assert solved == 10


def test_goal_option_resamples_until_mission_matches() -> None:
    env = BabyAITextEnv("BabyAI-GoToLocal-v0")
    _, info = env.reset(seed=11)
    wanted = info["goal"]
    _, info = env.reset(seed=12)
    assert info["goal"] != wanted  # otherwise the next check would prove nothing
    _, info = env.reset(seed=12, options={"goal": wanted})
    assert info["goal"] == wanted == env.mission and info["goal_category"] == "go_to"
    with pytest.raises(ValueError, match="fly to the moon"):
        env.reset(options={"goal": "fly to the moon"})
    with pytest.raises(ValueError, match="put the red ball next to the blue box"):
        env.reset(options={"goal": "put the red ball next to the blue box"})  # no such category in GoToLocal
    few = BabyAITextEnv("BabyAI-GoToLocal-v0", goal_tries=5)
    with pytest.raises(ValueError, match="go to the red door"):
        few.reset(seed=0, options={"goal": "go to the red door"})  # GoToLocal has no doors


def test_goal_category_option_on_a_mixture() -> None:
    env = BabyAITextEnv(["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0"])
    assert env.goal_categories == ["go_to", "pick_up"]
    for seed in range(5):
        _, info = env.reset(seed=seed, options={"goal_category": "pick_up"})
        assert info["goal_category"] == "pick_up" and info["level"] == "BabyAI-PickupLoc-v0"
    with pytest.raises(ValueError, match="open"):
        env.reset(options={"goal_category": "open"})


def test_invalid_action_raise_and_noop() -> None:
    env = BabyAITextEnv("BabyAI-GoToLocal-v0")
    _, info = env.reset(seed=0)
    assert info["admissible_actions"] == list(ACTIONS)
    with pytest.raises(InvalidActionError, match="jump"):
        env.step("jump")
    noop = BabyAITextEnv("BabyAI-GoToLocal-v0", invalid_action="noop")
    obs0, _ = noop.reset(seed=0)
    obs1, reward, _, _, info = noop.step("jump")
    assert obs1 == obs0 and reward == 0.0 and info["invalid_action"] and info["step"] == 1


def test_history_prefixes_previous_observations_and_actions() -> None:
    bare = BabyAITextEnv("BabyAI-GoToLocal-v0")
    ctx = BabyAITextEnv("BabyAI-GoToLocal-v0", history=2)
    o0, _ = bare.reset(seed=4)
    c0, _ = ctx.reset(seed=4)
    assert c0 == f"Observation 0: {o0}"
    o1 = bare.step("turn left")[0]
    o2 = bare.step("go forward")[0]
    o3 = bare.step("turn right")[0]
    ctx.step("turn left")
    ctx.step("go forward")
    c3 = ctx.step("turn right")[0]
    assert c3 == "\n".join(
        [
            f"Observation -2: {o1}",
            "Action -2: go forward",
            f"Observation -1: {o2}",
            "Action -1: turn right",
            f"Observation 0: {o3}",
        ]
    )


def test_unknown_level_names_it() -> None:
    with pytest.raises(ValueError, match="BabyAI-NoSuchLevel-v0"):
        BabyAITextEnv("BabyAI-NoSuchLevel-v0")


def test_gymnasium_make() -> None:
    import gymnasium as gym

    import envs  # noqa: F401 - registers the sacglam/ ids

    env = gym.make("sacglam/BabyAIText-v0", level="BabyAI-PickupLoc-v0")
    _, info = env.reset(seed=0)
    assert info["goal_category"] == "pick_up"
