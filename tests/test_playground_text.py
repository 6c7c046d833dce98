"""Tests of Playground-Text: exact hand-written episodes, step limits, the expert, splits, seeding, errors."""

from __future__ import annotations

import random
from collections import deque

import gymnasium
import pytest

import envs  # noqa: F401 - registers the sacglam/ ids
from envs.base import InvalidActionError
from envs.playground_text import (
    ALL_GOAL_CATEGORIES,
    GOAL_CATEGORIES,
    OBJECTS,
    STEP_LIMITS,
    PlaygroundState,
    PlaygroundTextEnv,
    playground_admissible,
    playground_expert,
    playground_transition,
)

HELD_OUT = {"bed", "onion", "bison", "jackal"}


def _goal_base(goal: str) -> str:
    """The base name of the object a goal names (``Grow red baby cow`` -> ``cow``)."""
    return OBJECTS[goal.split(" ", 1)[1]].base


def _obs(see: str, on: str, inventory: str) -> str:
    return f"You see: {see}\nYou are standing on: {on}\n{inventory}"


def test_hand_written_grow_herbivore_episode() -> None:
    """Every observation, action list, achieved goal and flag of a 10-step episode, written out by hand."""
    env = PlaygroundTextEnv()
    obs, info = env.reset(
        seed=0, options={"goal": "Grow cow", "objects": ["water", "carrot seed", "baby cow", "door"]}
    )
    assert obs == _obs("water, carrot seed, baby cow, door", "nothing", "Inventory (0/2): empty")
    assert info == {
        "goal": "Grow cow",
        "goal_category": "grow_herbivore",
        "admissible_actions": ["Go to water", "Go to carrot seed", "Go to baby cow", "Go to door"],
        "achieved_goals": [],
        "invalid_action": False,
    }
    # (action, observation, admissible actions, achieved goals, reward, terminated)
    script = [
        (
            "Go to door",
            _obs("water, carrot seed, baby cow, door", "door", "Inventory (0/2): empty"),
            ["Go to water", "Go to carrot seed", "Go to baby cow", "Grasp"],
            [],
        ),
        (
            "Grasp",
            _obs("water, carrot seed, baby cow", "nothing", "Inventory (1/2): door"),
            ["Go to water", "Go to carrot seed", "Go to baby cow", "Release door"],
            ["Grasp door"],
        ),
        (
            "Go to water",
            _obs("water, carrot seed, baby cow", "water", "Inventory (1/2): door"),
            ["Go to carrot seed", "Go to baby cow", "Grasp", "Release door"],
            [],
        ),
        (  # no rule for a door on water: dropped, visible again in its place, still standing on water
            "Release door",
            _obs("water, carrot seed, baby cow, door", "water", "Inventory (0/2): empty"),
            ["Go to carrot seed", "Go to baby cow", "Go to door", "Grasp"],
            [],
        ),
        (
            "Grasp",
            _obs("carrot seed, baby cow, door", "nothing", "Inventory (1/2): water"),
            ["Go to carrot seed", "Go to baby cow", "Go to door", "Release water"],
            ["Grasp water"],
        ),
        (
            "Go to carrot seed",
            _obs("carrot seed, baby cow, door", "carrot seed", "Inventory (1/2): water"),
            ["Go to baby cow", "Go to door", "Grasp", "Release water"],
            [],
        ),
        (  # water on a seed: the water is consumed, the seed becomes the plant the agent now stands on
            "Release water",
            _obs("carrot, baby cow, door", "carrot", "Inventory (0/2): empty"),
            ["Go to baby cow", "Go to door", "Grasp"],
            ["Grow carrot"],
        ),
        (
            "Grasp",
            _obs("baby cow, door", "nothing", "Inventory (1/2): carrot"),
            ["Go to baby cow", "Go to door", "Release carrot"],
            ["Grasp carrot"],
        ),
        (
            "Go to baby cow",
            _obs("baby cow, door", "baby cow", "Inventory (1/2): carrot"),
            ["Go to door", "Grasp", "Release carrot"],
            [],
        ),
        (
            "Release carrot",
            _obs("cow, door", "cow", "Inventory (0/2): empty"),
            ["Go to door", "Grasp"],
            ["Grow cow"],
        ),
    ]
    for t, (action, want_obs, want_actions, want_achieved) in enumerate(script, start=1):
        obs, reward, terminated, truncated, info = env.step(action)
        last = t == len(script)
        assert obs == want_obs, f"step {t}"
        assert info["admissible_actions"] == want_actions, f"step {t}"
        assert info["achieved_goals"] == want_achieved, f"step {t}"
        assert (reward, terminated, truncated) == ((1.0, True, False) if last else (0.0, False, False)), f"step {t}"
        assert info["goal"] == "Grow cow" and info["invalid_action"] is False
    # The goal was reached on the 10th step, exactly the grow-herbivore limit: terminated, not truncated.
    assert len(script) == STEP_LIMITS["grow_herbivore"] == env.elapsed_steps
    with pytest.raises(RuntimeError, match="reset"):
        env.step("Go to door")


@pytest.mark.parametrize("order", [("water", "door"), ("door", "water")])
def test_release_both_applies_rules_in_inventory_order(order: tuple[str, str]) -> None:
    env = PlaygroundTextEnv(goal_categories=["grow_plant"])
    env.reset(seed=0, options={"goal": "Grow carrot", "objects": ["water", "door", "carrot seed"]})
    for name in order:
        env.step(f"Go to {name}")
        env.step("Grasp")
    obs, _, _, _, info = env.step("Go to carrot seed")
    # Hands full and the only visible object stood on: releases only.
    assert info["admissible_actions"] == [f"Release {order[0]}", f"Release {order[1]}", "Release both"]
    assert obs == _obs("carrot seed", "carrot seed", f"Inventory (2/2): {order[0]}, {order[1]}")
    obs, reward, terminated, truncated, info = env.step("Release both")
    # Water grows the seed whichever goes first; the door finds no rule and lies visible again.
    assert obs == _obs("door, carrot", "carrot", "Inventory (0/2): empty")
    assert info["achieved_goals"] == ["Grow carrot"]
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert env.elapsed_steps == STEP_LIMITS["grow_plant"] == 6


def test_release_on_nothing_drops_the_object() -> None:
    state = PlaygroundState(("water", "carrot seed"), ("water",), None)
    assert playground_admissible(state) == ["Go to carrot seed", "Release water"]
    after, achieved = playground_transition(state, "Release water")
    assert after == PlaygroundState(("water", "carrot seed"), (), None)
    assert achieved == []


def test_growth_chain_to_carnivore_and_no_other_rules() -> None:
    # A grown herbivore on a baby carnivore grows it; a plant on a baby carnivore or water on a baby animal does not.
    s = PlaygroundState(("cow", "baby lion", "carrot", "baby deer", "water"), ("cow", "carrot"), "baby lion")
    after, achieved = playground_transition(s, "Release carrot")
    assert achieved == [] and after.on == "baby lion" and "carrot" in after.objects
    after, achieved = playground_transition(after, "Release cow")
    assert achieved == ["Grow lion"]
    assert after == PlaygroundState(("lion", "carrot", "baby deer", "water"), (), "lion")
    s = PlaygroundState(("water", "baby deer"), ("water",), "baby deer")
    assert playground_transition(s, "Release water")[1] == []


@pytest.mark.parametrize("category", ALL_GOAL_CATEGORIES)
def test_truncation_exactly_at_the_step_limit(category: str) -> None:
    goal = {
        "grasp": "Grasp water",
        "grow_plant": "Grow carrot",
        "grow_herbivore": "Grow cow",
        "grow_carnivore": "Grow lion",
        "impossible": "Grow door",
    }[category]
    env = PlaygroundTextEnv(impossible_goals=True)
    objects = ["water", "carrot seed", "baby cow", "baby lion", "door", "chair"]
    _, info = env.reset(seed=1, options={"goal": goal, "objects": objects})
    limit = {"grasp": 3, "grow_plant": 6, "grow_herbivore": 10, "grow_carnivore": 15, "impossible": 10}[category]
    assert env.goal_step_limit(goal) == limit
    for t in range(1, limit + 1):
        # Walking between the door and the chair never achieves anything.
        _, reward, terminated, truncated, info = env.step("Go to door" if t % 2 else "Go to chair")
        assert (reward, terminated) == (0.0, False)
        assert truncated is (t == limit), f"step {t} of limit {limit}"
        assert info["goal_category"] == category


def test_goal_step_limits_and_categories() -> None:
    env = PlaygroundTextEnv(colors=False)
    want = {
        "Grasp baby cow": ("grasp", 3),
        "Grasp water": ("grasp", 3),
        "Grow tomato": ("grow_plant", 6),
        "Grow giraffe": ("grow_herbivore", 10),
        "Grow wolf": ("grow_carnivore", 15),
        "Grow sofa": ("impossible", 10),
    }
    for goal, (category, limit) in want.items():
        assert (env.goal_category(goal), env.goal_step_limit(goal)) == (category, limit)
    for bad in ("Grow water", "Grow carrot seed", "Grasp unicorn", "Grasp red cow", ""):
        with pytest.raises(ValueError, match="unknown Playground-Text goal"):
            env.goal_category(bad)


def _run_expert(env: PlaygroundTextEnv, seed: int, category: str) -> tuple[bool, int, list[str]]:
    _, info = env.reset(seed=seed, options={"goal_category": category})
    achieved: list[str] = []
    while True:
        action = env.expert_action()
        assert action in info["admissible_actions"]
        _, reward, terminated, truncated, info = env.step(action)
        achieved += info["achieved_goals"]
        if terminated or truncated:
            return terminated and reward == 1.0, env.elapsed_steps, achieved


# The expert's longest plan from a reset state (fewer when a distractor offers a grown plant or herbivore).
OPTIMAL_BOUND = {"grasp": 2, "grow_plant": 4, "grow_herbivore": 7, "grow_carnivore": 10}


@pytest.mark.parametrize("colors", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_expert_solves_every_category(colors: bool, split: str) -> None:
    env = PlaygroundTextEnv(impossible_goals=True, colors=colors, split=split)
    for category in GOAL_CATEGORIES:
        for seed in range(25):
            solved, steps, _ = _run_expert(env, seed, category)
            assert solved, f"{category} seed {seed}: {env.state}"
            assert steps <= OPTIMAL_BOUND[category]
    for seed in range(25):
        solved, steps, achieved = _run_expert(env, seed, "impossible")
        assert not solved and steps == STEP_LIMITS["impossible"]
        assert not any(env.goal_category(g) == "impossible" for g in achieved)


def test_expert_needs_the_whole_chain_for_a_carnivore() -> None:
    """With no grown food around, the carnivore takes the full 10-step chain (water -> plant -> herbivore)."""
    env = PlaygroundTextEnv()
    env.reset(options={"goal": "Grow lion", "objects": ["door", "baby lion", "baby cow", "carrot seed", "water"]})
    actions = []
    while True:
        actions.append(env.expert_action())
        _, _, terminated, truncated, info = env.step(actions[-1])
        if terminated or truncated:
            break
    assert terminated and info["achieved_goals"] == ["Grow lion"]
    assert actions == [
        "Go to water", "Grasp", "Go to carrot seed", "Release water", "Grasp",
        "Go to baby cow", "Release carrot", "Grasp", "Go to baby lion", "Release cow",
    ]  # fmt: skip


def _reachable(state: PlaygroundState, goal: str) -> bool:
    """Exhaustive breadth-first search over the (finite) states reachable from ``state``: can ``goal`` be achieved?"""
    seen = {state}
    frontier = deque([state])
    while frontier:
        s = frontier.popleft()
        for action in playground_admissible(s):
            nxt, achieved = playground_transition(s, action)
            if goal in achieved:
                return True
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return False


def test_expert_from_random_reachable_states_matches_search() -> None:
    """From states left by random play, the expert reaches the goal exactly when a search says it is reachable."""
    rng = random.Random(0)
    env = PlaygroundTextEnv(n_objects=5)
    counts = {True: 0, False: 0}
    for seed in range(300):
        _, info = env.reset(seed=seed, options={"goal_category": GOAL_CATEGORIES[seed % 4]})
        goal: str = info["goal"]
        state = env.state
        # Mix random actions with an expert chasing another growth, which often uses up water or food.
        others = [OBJECTS[o].grown for o in state.objects if OBJECTS[o].grown is not None]
        other = f"Grow {rng.choice(others or ['cow'])}"
        for _ in range(rng.randrange(1, 12)):
            action = playground_expert(state, other) if rng.random() < 0.7 else None
            state, _ = playground_transition(state, action or rng.choice(playground_admissible(state)))
        reachable = _reachable(state, goal)
        reached = False
        for _ in range(30):  # the expert needs at most 10 steps plus a few to put things down
            action = playground_expert(state, goal)
            if action is None:
                break
            assert action in playground_admissible(state)
            state, achieved = playground_transition(state, action)
            if goal in achieved:
                reached = True
                break
        assert reached == reachable, f"seed {seed} goal {goal!r} state {state}"
        counts[reachable] += 1
    assert counts[True] > 100 and counts[False] > 30, counts  # both cases were exercised


def test_random_play_never_achieves_impossible_or_held_out_goals() -> None:
    rng = random.Random(1)
    env = PlaygroundTextEnv(impossible_goals=True)
    train_goals = {g for c in ALL_GOAL_CATEGORIES for g in env.goal_space(c, "train")}
    seen_categories = set()
    for seed in range(300):
        _, info = env.reset(seed=seed)
        done = False
        while not done:
            _, reward, terminated, truncated, info = env.step(rng.choice(info["admissible_actions"]))
            done = terminated or truncated
            for g in info["achieved_goals"]:
                seen_categories.add(env.goal_category(g))
                assert g in train_goals and env.goal_category(g) != "impossible"
            assert reward == (1.0 if info["goal"] in info["achieved_goals"] else 0.0)
            assert not (info["goal_category"] == "impossible" and terminated)
    assert {"grasp", "grow_plant"} <= seen_categories


def test_held_out_objects_never_in_training_goals_or_scenes() -> None:
    train = PlaygroundTextEnv(impossible_goals=True, split="train")
    test = PlaygroundTextEnv(impossible_goals=True, split="test")
    train_goals = set()
    for seed in range(1500):
        obs, info = train.reset(seed=seed)
        train_goals.add(info["goal"])
        assert _goal_base(info["goal"]) not in HELD_OUT
        assert not {OBJECTS[o].base for o in train.state.objects} & HELD_OUT, obs
        _, info = test.reset(seed=seed)
        assert _goal_base(info["goal"]) in HELD_OUT
    # Sampling covers most of the training goal space (so a split leak would have had the chance to show).
    n_train_goals = sum(len(train.goal_space(c, "train")) for c in ALL_GOAL_CATEGORIES)
    assert len(train_goals) > 0.9 * n_train_goals
    assert sorted(test.goal_space("grow_carnivore", "test")) == ["Grow jackal"]
    assert sorted(test.goal_space("grow_plant", "test")) == ["Grow onion"]
    assert not any(_goal_base(g) in HELD_OUT for c in ALL_GOAL_CATEGORIES for g in train.goal_space(c, "train"))
    # Evaluating a held-out goal in a training env: only the goal's own object is held out, the rest is training.
    train.reset(seed=0, options={"goal": "Grow jackal"})
    assert [OBJECTS[o].base for o in train.state.objects if OBJECTS[o].base in HELD_OUT] == ["jackal"]


def test_goal_space_sizes() -> None:
    env = PlaygroundTextEnv()
    # grasp: 8 furniture + 8 x 2 stages x 3 growing kinds + water = 57 in train; 1 + 2 x 3 = 7 held out.
    sizes = {c: (len(env.goal_space(c, "train")), len(env.goal_space(c, "test"))) for c in ALL_GOAL_CATEGORIES}
    assert sizes == {
        "grasp": (57, 7),
        "grow_plant": (8, 1),
        "grow_herbivore": (8, 1),
        "grow_carnivore": (8, 1),
        "impossible": (8, 1),
    }
    colored = PlaygroundTextEnv(colors=True)
    assert len(colored.goal_space("grasp", "train")) == 56 * 3 + 1  # water has no colour
    assert "Grow red cow" in colored.goal_space("grow_herbivore", "train")


def test_seeded_reset_and_steps_are_reproducible() -> None:
    def rollout(seed: int) -> list[tuple[str, dict]]:
        env = PlaygroundTextEnv(impossible_goals=True, n_objects=6)
        rng = random.Random(seed)
        trace = []
        for episode in range(4):
            obs, info = env.reset(seed=seed if episode == 0 else None)
            trace.append((obs, info))
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(rng.choice(info["admissible_actions"]))
                trace.append((obs, info))
                done = terminated or truncated
        return trace

    assert rollout(7) == rollout(7)
    assert rollout(7) != rollout(8)


def test_invalid_action_raises_with_admissible_list() -> None:
    env = PlaygroundTextEnv()
    _, info = env.reset(seed=0, options={"goal": "Grasp water", "objects": ["water", "door"]})
    with pytest.raises(InvalidActionError) as excinfo:
        env.step("Grasp")  # standing on nothing
    message = str(excinfo.value)
    assert "'Grasp'" in message and "['Go to water', 'Go to door']" in message
    assert excinfo.value.admissible == info["admissible_actions"]


def test_invalid_action_noop_counts_a_wasted_step() -> None:
    env = PlaygroundTextEnv(invalid_action="noop")
    obs0, _ = env.reset(seed=0, options={"goal": "Grasp water", "objects": ["water", "door"]})
    obs, reward, terminated, truncated, info = env.step("Fly away")
    assert (obs, reward, terminated, truncated) == (obs0, 0.0, False, False)
    assert info["invalid_action"] is True and info["achieved_goals"] == []
    obs, _, _, _, info = env.step("Go to water")
    assert info["invalid_action"] is False
    _, reward, terminated, truncated, info = env.step("Grasp")
    # The wasted step counted: the grasp lands on step 3, the limit, and still terminates (not truncates).
    assert (reward, terminated, truncated, env.elapsed_steps) == (1.0, True, False, 3)
    env.reset(seed=0, options={"goal": "Grasp water", "objects": ["water", "door"]})
    results = [env.step("nonsense")[2:4] for _ in range(3)]
    assert results == [(False, False), (False, False), (False, True)]


def test_reset_errors() -> None:
    env = PlaygroundTextEnv()
    with pytest.raises(ValueError, match=r"unknown Playground-Text goal 'Grow a unicorn'.*e\.g\. 'Grasp water'"):
        env.reset(options={"goal": "Grow a unicorn"})
    with pytest.raises(ValueError, match="unknown goal category 'dance'"):
        env.reset(options={"goal_category": "dance"})
    with pytest.raises(ValueError, match="unknown object names"):
        env.reset(options={"goal": "Grasp water", "objects": ["water", "unicorn"]})
    with pytest.raises(ValueError, match="at most once"):
        env.reset(options={"goal": "Grow cow", "objects": ["carrot", "carrot seed"]})
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"scene": []})
    with pytest.raises(ValueError, match="n_objects=3"):
        PlaygroundTextEnv(n_objects=3)  # a grow-carnivore scene needs 4
    with pytest.raises(ValueError, match="unknown goal categories"):
        PlaygroundTextEnv(goal_categories=["grasp", "fly"])
    with pytest.raises(ValueError, match="goal_weights has 1 entries"):
        PlaygroundTextEnv(goal_weights=[1.0])


def test_goal_weights_and_category_option() -> None:
    env = PlaygroundTextEnv(impossible_goals=True, goal_weights={"grow_plant": 1.0})
    assert env.goal_categories == ["grasp", "grow_plant", "grow_herbivore", "grow_carnivore", "impossible"]
    assert {env.reset(seed=s)[1]["goal_category"] for s in range(50)} == {"grow_plant"}
    env = PlaygroundTextEnv(goal_categories=["grasp", "grow_plant"], goal_weights=[3.0, 1.0])
    cats = [env.reset(seed=s)[1]["goal_category"] for s in range(400)]
    assert 0.65 < cats.count("grasp") / 400 < 0.85
    _, info = env.reset(seed=0, options={"goal_category": "grow_carnivore"})
    assert info["goal_category"] == "grow_carnivore" and info["goal"] in env.goal_space("grow_carnivore", "train")


def test_sampled_scenes_hold_what_the_goal_needs() -> None:
    env = PlaygroundTextEnv(n_objects=6)
    for seed in range(200):
        _, info = env.reset(seed=seed, options={"goal_category": "grow_carnivore"})
        objects = env.state.objects
        stages = [OBJECTS[o].stage for o in objects]
        target = info["goal"].removeprefix("Grow ")
        assert len(objects) == 6 and len({OBJECTS[o].base for o in objects}) == 6
        assert OBJECTS[target].source in objects
        assert "baby_herbivore" in stages and "seed" in stages and "water" in objects


def test_gymnasium_make_and_pure_reward() -> None:
    env = gymnasium.make("sacglam/PlaygroundText-v0", goal_categories=["grasp"], n_objects=4)
    inner = env.unwrapped
    assert isinstance(inner, PlaygroundTextEnv)
    obs, info = env.reset(seed=3)
    assert obs.startswith("You see: ") and len(inner.state.objects) == 4
    assert info["goal_category"] == "grasp" and inner.goal_categories == ["grasp"]
    obs, *_ = env.step(info["admissible_actions"][0])
    assert "You are standing on: " in obs
    achieved = ["Grasp water", "Grow cow"]
    assert PlaygroundTextEnv.compute_reward(achieved, "Grow cow") == 1.0
    assert PlaygroundTextEnv.compute_reward(achieved, "Grow lion") == 0.0
    assert PlaygroundTextEnv.compute_reward([], "Grow cow") == 0.0
    assert achieved == ["Grasp water", "Grow cow"]  # untouched


def test_n_objects_range_draws_scene_sizes_per_episode() -> None:
    env = PlaygroundTextEnv(n_objects=(3, 6), goal_categories=["grasp", "grow_plant"])
    sizes = set()
    for seed in range(200):
        _, info = env.reset(seed=seed)
        n = len(env.state.objects)
        sizes.add(n)
        assert 3 <= n <= 6
        if info["goal_category"] == "grow_plant":  # water + the seed at least
            assert n >= 2
        # The expert still solves every episode.
        for _ in range(STEP_LIMITS[info["goal_category"]]):
            _, reward, terminated, truncated, info = env.step(env.expert_action())
            if terminated or truncated:
                break
        assert terminated and reward == 1.0
    assert sizes == {3, 4, 5, 6}
    with pytest.raises(ValueError, match="pair"):
        PlaygroundTextEnv(n_objects=(5, 3))
