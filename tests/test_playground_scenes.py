"""Playground-Text scenes as the reference builds them (LittleZoo, IMAGINE's playground, WorldLLM): nothing living
starts grown, a goal's scene holds exactly its supplies, the expert solves every scene; the ``grown_distractors``
ablation replays the pre-reference scenes; LittleZoo's big animals (``big_animals=True``)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import pytest

from envs.playground_text import (
    BIG_GOAL_CATEGORIES,
    GOAL_CATEGORIES,
    OBJECTS,
    STEP_LIMITS,
    WATER,
    PlaygroundState,
    PlaygroundTextEnv,
    playground_admissible,
    playground_transition,
)

GROWN = ("plant", "herbivore", "carnivore", "big_herbivore", "big_carnivore")
# Supplies of a grow goal (beside the young target itself), as stages; LittleZoo's reset_with_goal.
SUPPLIES: dict[str, list[Counter[str]]] = {
    "grow_plant": [Counter({"water": 1})],
    "grow_herbivore": [Counter({"water": 1, "seed": 1})],
    "grow_carnivore": [Counter({"water": 1, "seed": 1, "baby_herbivore": 1})],
    "grow_big_herbivore": [Counter({"water": 2, "seed": 2})],
    "grow_big_carnivore": [
        Counter({"water": 2, "seed": 2, "baby_big_herbivore": 1}),
        Counter({"water": 2, "seed": 2, "baby_herbivore": 2}),
    ],
}
# Stages a distractor may take in a reference scene (anything that is neither a supply nor grown).
SUPPLY_STAGES = {"water", "seed", "baby_herbivore", "baby_big_herbivore"}


def _solve(env: PlaygroundTextEnv, info: dict[str, object]) -> tuple[bool, int]:
    while True:
        action = env.expert_action()
        assert action in info["admissible_actions"]  # type: ignore[operator]
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return terminated, env.elapsed_steps


def _check_reference_scene(objects: Sequence[str], goal: str, category: str) -> None:
    target = goal.split(" ", 1)[1]
    if category == "grasp":
        assert target in objects
        rest = list(objects)
        rest.remove(target)  # a grasp target may be grown (it is named as stated); nothing else is
        assert not [o for o in rest if OBJECTS[o].stage in GROWN], (goal, objects)
        return
    assert not [o for o in objects if OBJECTS[o].stage in GROWN], (goal, objects)
    source = OBJECTS[target].source
    assert source in objects
    # The supplies are exactly the goal's: distractors are furniture or young things of no use to this chain.
    stages = Counter(OBJECTS[o].stage for o in objects if o != source)
    supplies = Counter({s: n for s, n in stages.items() if s in SUPPLY_STAGES})
    if category in ("grow_plant", "grow_herbivore", "grow_carnivore"):
        # Seeds and baby herbivores can also be plain distractors; water never is (at most the goal's).
        need = SUPPLIES[category][0]
        assert supplies["water"] == need["water"], (goal, objects)
        assert all(supplies[s] >= n for s, n in need.items()), (goal, objects)
    else:
        assert supplies["water"] == 2
        assert any(all(supplies[s] >= n for s, n in need.items()) for need in SUPPLIES[category]), (goal, objects)


@pytest.mark.parametrize("category", GOAL_CATEGORIES)
def test_ten_thousand_reference_scenes_per_category(category: str) -> None:
    """No grown living object but a grasp target; each grow scene holds its supplies; the expert solves all."""
    env = PlaygroundTextEnv()
    assert env.grown_distractors == 0.0
    worst = 0
    for seed in range(10_000):
        _, info = env.reset(seed=seed, options={"goal_category": category})
        _check_reference_scene(env.state.objects, str(info["goal"]), category)
        solved, steps = _solve(env, info)
        assert solved and steps <= STEP_LIMITS[category], (seed, info["goal"])
        worst = max(worst, steps)
    assert worst == {"grasp": 2, "grow_plant": 4, "grow_herbivore": 7, "grow_carnivore": 10}[category]


def test_reference_scene_has_one_water_and_nothing_grown() -> None:
    """A smaller carnivore scene: its one water is the goal's, and nothing in it starts grown."""
    env = PlaygroundTextEnv(n_objects=6)
    for seed in range(200):
        env.reset(seed=seed, options={"goal_category": "grow_carnivore"})
        young = sorted(OBJECTS[o].stage for o in env.state.objects if OBJECTS[o].kind != "furniture")
        assert "baby_carnivore" in young and young.count("water") == 1, env.state.objects
        assert not [o for o in env.state.objects if OBJECTS[o].stage in GROWN]


# sha256 of the first 500 scenes per category as the code before the reference scenes drew them (commit 76d9cba,
# default arguments); grown_distractors=0.5 must replay them draw for draw, so old runs can be reproduced.
OLD_SCENES_SHA = "bc998746b5da1704c5fd1b0884250b107590eeb49febefe1d289d7b8cfdd7f62"


def _scene_hash(env: PlaygroundTextEnv) -> str:
    h = hashlib.sha256()
    for category in GOAL_CATEGORIES:
        for seed in range(500):
            obs, info = env.reset(seed=seed, options={"goal_category": category})
            h.update((str(info["goal"]) + "|" + obs + "\n").encode())
    return h.hexdigest()


def test_grown_distractors_ablation_replays_the_old_scenes() -> None:
    assert _scene_hash(PlaygroundTextEnv(grown_distractors=0.5)) == OLD_SCENES_SHA
    assert _scene_hash(PlaygroundTextEnv()) != OLD_SCENES_SHA


@pytest.mark.parametrize(("p", "herbivore_share", "carnivore_share"), [(0.5, 0.48, 0.40), (0.0, 0.0, 0.0)])
def test_grown_distractors_share_of_shortcut_scenes(p: float, herbivore_share: float, carnivore_share: float) -> None:
    """The old scenes offered the grown food in 48% of herbivore and 40% of carnivore scenes (scripts/
    shortcut_eval.py); the reference scenes in none. 4,000 scenes each: the binomial sd is under 0.008."""
    env = PlaygroundTextEnv(grown_distractors=p)
    for category, food, share in (("grow_herbivore", "plant", herbivore_share),
                                  ("grow_carnivore", "herbivore", carnivore_share)):
        hits = 0
        for seed in range(4000):
            env.reset(seed=seed, options={"goal_category": category})
            hits += any(OBJECTS[o].stage == food for o in env.state.objects)
        assert abs(hits / 4000 - share) < 0.025, (category, hits / 4000)


def test_grown_distractors_other_probabilities() -> None:
    env = PlaygroundTextEnv(grown_distractors=1.0)
    env.reset(seed=0, options={"goal_category": "grow_plant"})
    living = [o for o in env.state.objects[1:] if OBJECTS[o].kind not in ("furniture", "water")]
    target_source = [o for o in env.state.objects if OBJECTS[o].stage == "seed"]
    assert len(target_source) == 1 and all(OBJECTS[o].stage in GROWN for o in living if o not in target_source)
    with pytest.raises(ValueError, match="grown_distractors is a probability"):
        PlaygroundTextEnv(grown_distractors=1.5)


# ------------------------------------------------------------------------------------------------------------------
# Big animals (LittleZoo)

BIG = [*GOAL_CATEGORIES, *BIG_GOAL_CATEGORIES]


def test_big_animal_rules_by_hand() -> None:
    # Two grown plants released together grow a big herbivore; one alone is dropped.
    s = PlaygroundState(("baby rhinoceros", "carrot", "potato"), ("carrot", "potato"), "baby rhinoceros")
    after, achieved = playground_transition(s, "Release carrot")
    assert achieved == [] and after == PlaygroundState(s.objects, ("potato",), "baby rhinoceros")
    after, achieved = playground_transition(s, "Release both")
    assert achieved == ["Grow rhinoceros"]
    assert after == PlaygroundState(("rhinoceros",), (), "rhinoceros")
    # A big carnivore: one grown big herbivore, or two grown herbivores together (not one, not a plant pair).
    s = PlaygroundState(("baby shark", "cow", "deer"), ("cow", "deer"), "baby shark")
    assert playground_transition(s, "Release cow")[1] == []
    assert playground_transition(s, "Release both") == (PlaygroundState(("shark",), (), "shark"), ["Grow shark"])
    s = PlaygroundState(("rhinoceros", "baby shark"), ("rhinoceros",), "baby shark")
    assert playground_transition(s, "Release rhinoceros") == (PlaygroundState(("shark",), (), "shark"),
                                                              ["Grow shark"])
    s = PlaygroundState(("baby shark", "carrot", "potato"), ("carrot", "potato"), "baby shark")
    assert playground_transition(s, "Release both")[1] == []
    # A small carnivore does not eat a big herbivore; a small herbivore does not eat two plants at once.
    s = PlaygroundState(("rhinoceros", "baby lion"), ("rhinoceros",), "baby lion")
    assert playground_transition(s, "Release rhinoceros")[1] == []
    s = PlaygroundState(("baby cow", "carrot", "potato"), ("carrot", "potato"), "baby cow")
    assert playground_transition(s, "Release both")[1] == ["Grow cow"]  # the first plant grows it, as before


def test_two_waters_share_one_name() -> None:
    s = PlaygroundState(("water", "carrot seed", "water", "potato seed"), (), None)
    assert playground_admissible(s).count("Go to water") == 1
    s, _ = playground_transition(s, "Go to water")
    s, _ = playground_transition(s, "Grasp")
    assert s.held == ("water",) and s.objects.count(WATER) == 2
    assert "Go to water" in playground_admissible(s)  # the other one is still there
    s, _ = playground_transition(s, "Go to carrot seed")
    s, achieved = playground_transition(s, "Release water")
    assert achieved == ["Grow carrot"] and s.objects == ("carrot", "water", "potato seed") and s.held == ()


@pytest.mark.parametrize("category", BIG_GOAL_CATEGORIES)
def test_big_animal_scenes_and_expert(category: str) -> None:
    env = PlaygroundTextEnv(goal_categories=BIG, big_animals=True)
    assert env.all_goal_categories == BIG
    paths = Counter()
    for seed in range(2000):
        _, info = env.reset(seed=seed, options={"goal_category": category})
        assert env.goal_category(str(info["goal"])) == category
        _check_reference_scene(env.state.objects, str(info["goal"]), category)
        if category == "grow_big_carnivore":
            paths[any(OBJECTS[o].stage == "baby_big_herbivore" for o in env.state.objects)] += 1
        solved, steps = _solve(env, info)
        assert solved and steps <= {"grow_big_herbivore": 12, "grow_big_carnivore": 18}[category]
        assert env.goal_step_limit(str(info["goal"])) == {"grow_big_herbivore": 18, "grow_big_carnivore": 27}[category]
    if category == "grow_big_carnivore":  # both of LittleZoo's supplies, near 50/50 (distractors add a few)
        assert 900 < paths[True] < 1300, paths


def test_big_animals_off_by_default() -> None:
    env = PlaygroundTextEnv()
    for seed in range(300):
        env.reset(seed=seed)
        assert not [o for o in env.state.objects if OBJECTS[o].kind.startswith("big_")]
    assert not [g for c in GOAL_CATEGORIES for g in env.goal_space(c, "train") if "rhinoceros" in g]
    with pytest.raises(ValueError, match="pass big_animals=True"):
        PlaygroundTextEnv(goal_categories=["grow_big_herbivore"])
    with pytest.raises(ValueError, match="unknown Playground-Text goal 'Grow shark'"):
        env.reset(options={"goal": "Grow shark"})
    with pytest.raises(ValueError, match="unknown goal category 'grow_big_carnivore'"):
        env.reset(options={"goal_category": "grow_big_carnivore"})
    with pytest.raises(ValueError, match="holds big animals"):
        env.reset(options={"goal": "Grasp water", "objects": ["water", "baby shark"]})
    with pytest.raises(ValueError, match="water at most 2 times"):
        PlaygroundTextEnv(big_animals=True).reset(options={"goal": "Grasp water", "objects": ["water"] * 3})


def test_big_animal_held_out_split() -> None:
    env = PlaygroundTextEnv(goal_categories=BIG_GOAL_CATEGORIES, big_animals=True, split="test")
    assert env.goal_space("grow_big_herbivore", "test") == ["Grow buffalo"]
    assert env.goal_space("grow_big_carnivore", "test") == ["Grow cougar"]
    train = PlaygroundTextEnv(goal_categories=BIG_GOAL_CATEGORIES, big_animals=True)
    for seed in range(300):
        train.reset(seed=seed)
        assert not {"buffalo", "cougar"} & {OBJECTS[o].base for o in train.state.objects}


def test_set_goal_weights_reweights_later_resets() -> None:
    env = PlaygroundTextEnv()
    env.set_goal_weights({"grow_carnivore": 1.0})
    assert {env.reset(seed=s)[1]["goal_category"] for s in range(50)} == {"grow_carnivore"}
    env.set_goal_weights([1.0, 0.0, 0.0, 0.0])
    assert {env.reset(seed=s)[1]["goal_category"] for s in range(50)} == {"grasp"}
    with pytest.raises(ValueError, match="not in goal_categories"):
        env.set_goal_weights({"impossible": 1.0})
