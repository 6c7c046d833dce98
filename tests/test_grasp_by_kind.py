"""scripts/grasp_by_kind.py: the kind of a grasp goal's target, and scenes filtered by it."""

from __future__ import annotations

import pytest

from envs.playground_text import OBJECTS, PlaygroundTextEnv
from tests.scripts_util import load_script

gbk = load_script("grasp_by_kind")
KINDS, KindFilter, kind_shares, target_kind = gbk.KINDS, gbk.KindFilter, gbk.kind_shares, gbk.target_kind


def test_target_kind_by_hand() -> None:
    stages = {o.stage for o in OBJECTS.values()}
    assert {"seed", "plant", "furniture", "water"} <= stages
    by_stage = {o.stage: name for name, o in OBJECTS.items()}
    assert target_kind(f"Grasp {by_stage['seed']}") == "seed"
    assert target_kind(f"Grasp {by_stage['plant']}") == "grown plant"
    assert target_kind(f"Grasp {by_stage['baby_herbivore']}") == "baby animal"
    assert target_kind(f"Grasp {by_stage['carnivore']}") == "grown animal"
    assert target_kind(f"Grasp {by_stage['furniture']}") == "furniture"
    with pytest.raises(ValueError, match="not a Playground-Text grasp goal"):
        target_kind(f"Grow {by_stage['seed']}")


def test_kind_filter_only_returns_its_kind_and_is_seeded() -> None:
    env = PlaygroundTextEnv(goal_categories=["grasp"])
    shares = kind_shares(env, draws=200)
    assert set(shares) <= set(KINDS) and sum(shares.values()) == 200 and shares["seed"] > 0
    filtered = KindFilter(PlaygroundTextEnv(goal_categories=["grasp"]), "seed")
    goals = [filtered.reset(seed=s)[1]["goal"] for s in range(10)]
    assert all(target_kind(g) == "seed" for g in goals)
    assert goals == [filtered.reset(seed=s)[1]["goal"] for s in range(10)]  # the same seeds, the same scenes
    with pytest.raises(ValueError, match="unknown kind"):
        KindFilter(env, "rock")
