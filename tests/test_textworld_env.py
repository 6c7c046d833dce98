"""TextWorld env: a game generated here by the suite script, solved by its walkthrough and by the expert."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from envs.base import InvalidActionError
from envs.textworld_env import TextWorldEnv, clean_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def game(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small coin-collector game, made once per test module by the script's CLI (about 3-8 s)."""
    out = tmp_path_factory.mktemp("games")
    result = _make_games(out)
    paths = sorted(out.glob("*.z8"))
    assert len(paths) == 1 and "| made |" in result.stdout, result.stdout + result.stderr
    return paths[0]


def _make_games(out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "scripts" / "make_textworld_games.py"), "--quick", "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)


@pytest.mark.integration
def test_script_skips_existing_games(game: Path) -> None:
    result = _make_games(game.parent)
    assert f"| {game} | exists, skipped | - |" in result.stdout
    assert sorted(game.parent.glob("*.z8")) == [game]


def test_walkthrough_wins_with_rewards_summing_to_max_score(game: Path) -> None:
    env = TextWorldEnv(game)
    obs, info = env.reset(seed=0)
    assert info["goal"] == env.objective and info["goal_category"] == "objective"
    assert obs and info["admissible_actions"] and info["achieved_goals"] == []
    assert env.walkthrough, "tw-make games carry a walkthrough"
    total = 0.0
    for k, command in enumerate(env.walkthrough):
        assert command in info["admissible_actions"], (command, info["admissible_actions"])
        obs, reward, terminated, truncated, info = env.step(command)
        total += reward
        assert terminated == (k == len(env.walkthrough) - 1) and not truncated
    assert info["won"] and total == env.max_score == info["score"] and env.max_score > 0
    assert env.objective in info["achieved_goals"]


def test_achieved_goals_follow_the_rules(game: Path) -> None:
    env = TextWorldEnv(game)
    env.reset(seed=0)
    seen: list[list[str]] = []
    for command in env.walkthrough:
        seen.append(env.step(command)[4]["achieved_goals"])
    for command, achieved in zip(env.walkthrough, seen, strict=True):
        if command.startswith("go "):
            # A move into another room achieves exactly "go to the <room>", a room of the game.
            assert len(achieved) == 1 and achieved[0].startswith("go to the ")
            assert achieved[0].removeprefix("go to the ") in env.rooms
        elif command.startswith("take "):
            item = command.removeprefix("take ").split(" from ")[0]
            assert achieved[0] == f"take the {item}"
    # Consecutive moves reach different rooms: the rule reports each arrival once.
    rooms = [a[0] for c, a in zip(env.walkthrough, seen, strict=True) if c.startswith("go ")]
    assert len(rooms) == len(set(rooms))


def test_look_achieves_nothing_and_invalid_actions(game: Path) -> None:
    env = TextWorldEnv(game)
    _, info = env.reset(seed=0)
    assert "look" in info["admissible_actions"]
    _, reward, terminated, _, info = env.step("look")  # the room heading repeats: not a new arrival
    assert info["achieved_goals"] == [] and reward == 0.0 and not terminated
    with pytest.raises(InvalidActionError, match="fly away"):
        env.step("fly away")
    noop = TextWorldEnv(game, invalid_action="noop")
    obs0, _ = noop.reset(seed=0)
    obs1, reward, _, _, info = noop.step("fly away")
    assert obs1 == obs0 and reward == 0.0 and info["invalid_action"]


def test_truncation_at_max_steps(game: Path) -> None:
    env = TextWorldEnv(game, max_steps=2)
    env.reset(seed=0)
    assert env.step("look")[3] is False
    _, _, terminated, truncated, _ = env.step("look")
    assert truncated and not terminated


def test_same_seed_same_observations(game: Path) -> None:
    def rollout(env: TextWorldEnv) -> list[str]:
        obs, info = env.reset(seed=3)
        out = [obs]
        for k in range(8):
            actions = info["admissible_actions"]
            obs, _, terminated, _, info = env.step(actions[(5 * k + 1) % len(actions)])
            out.append(obs)
            if terminated:
                break
        return out

    first = rollout(TextWorldEnv(game))
    assert first == rollout(TextWorldEnv(game))
    assert len(set(first)) > 1  # the rollout moved around, so the comparison can fail


def test_rule_goal_rewards_one_and_terminates(game: Path) -> None:
    env = TextWorldEnv(game)
    first_move = env.walkthrough[0]
    _, info = env.reset(seed=0)
    probe = env.step(first_move)[4]["achieved_goals"]
    assert len(probe) == 1 and probe[0].startswith("go to the ")
    _, info = env.reset(options={"goal": probe[0]})
    assert info["goal"] == probe[0] and info["goal_category"] == "go_to"
    _, reward, terminated, _, _ = env.step(first_move)
    assert reward == 1.0 and terminated

    take = next(c for c in env.walkthrough if c.startswith("take "))
    goal = "take the " + take.removeprefix("take ").split(" from ")[0]
    assert goal in env.rule_goals["take"]
    env.reset(options={"goal": goal})
    rewards = []
    for command in env.walkthrough:
        _, reward, terminated, _, _ = env.step(command)
        rewards.append(reward)
        if terminated:
            break
    assert rewards == [0.0] * (len(rewards) - 1) + [1.0] and command == take


def test_goal_options_and_errors(game: Path) -> None:
    env = TextWorldEnv(game)
    for seed in range(3):
        _, info = env.reset(seed=seed, options={"goal_category": "go_to"})
        assert info["goal"] in env.rule_goals["go_to"] and info["goal_category"] == "go_to"
    assert env.reset(options={"goal_category": "objective"})[1]["goal"] == env.objective
    with pytest.raises(ValueError, match="take the moon"):
        env.reset(options={"goal": "take the moon"})
    with pytest.raises(ValueError, match="dance"):
        env.reset(options={"goal_category": "dance"})
    assert env.goal_category("take the coin") == "take" and env.goal_step_limit("take the coin") == 50


def test_missing_game_names_path_and_script(tmp_path: Path) -> None:
    missing = tmp_path / "nope.z8"
    with pytest.raises(FileNotFoundError) as err:
        TextWorldEnv(missing)
    assert str(missing) in str(err.value) and "python scripts/make_textworld_games.py" in str(err.value)


def test_expert_wins_from_start_and_after_a_detour(game: Path) -> None:
    for detour in (False, True):
        env = TextWorldEnv(game)  # fresh: the detour case also checks the rebuild-and-replay of the first call
        _, info = env.reset(seed=0)
        if detour:
            # A move off the walkthrough, so the expert must plan from where the agent is.
            _, _, _, _, info = env.step(env.walkthrough[0])
            off = [a for a in info["admissible_actions"] if a.startswith("go ") and a != env.walkthrough[1]]
            assert off, info["admissible_actions"]
            env.step(off[0])
        total = 0.0
        for _ in range(env.max_steps):
            _, reward, terminated, truncated, info = env.step(env.expert_action())
            total += reward
            if terminated or truncated:
                break
        assert info["won"] and total == env.max_score


def test_expert_reaches_every_rule_goal(game: Path) -> None:
    env = TextWorldEnv(game)
    assert len(env.rule_goals["go_to"]) >= 3 and env.rule_goals["take"] == ["take the coin"]
    # The start room included (leave it and come back); the coin lies rooms away from the start.
    for goal in [*env.rule_goals["go_to"], "take the coin"]:
        env.reset(options={"goal": goal})
        total = 0.0
        for _ in range(env.max_steps):
            _, reward, terminated, truncated, info = env.step(env.expert_action())
            total += reward
            if terminated or truncated:
                break
        assert terminated and total == 1.0 and goal in info["achieved_goals"], goal


def test_clean_text_exact() -> None:
    raw = (
        "\n\n  ___ \n | $$ |\n\n-= Kitchen =-\n  You are in a kitchen.  \n\n\n\nThere is a door.\n>  -= Kitchen =-0/1"
    )
    assert clean_text(raw) == "-= Kitchen =-\nYou are in a kitchen.\n\nThere is a door."


def test_gymnasium_make(game: Path) -> None:
    import gymnasium as gym

    import envs  # noqa: F401 - registers the sacglam/ ids

    env = gym.make("sacglam/TextWorld-v0", game=str(game), max_steps=7)
    _, info = env.reset(seed=0)
    assert info["goal_category"] == "objective" and info["admissible_actions"]
    assert env.unwrapped.goal_step_limit(info["goal"]) == 7  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.ci
def test_simple_and_cooking_games_walkthrough_and_expert_on_every_goal(tmp_path: Path) -> None:
    """Games with doors, containers and recipes (about 10-20 s to make): the walkthrough wins, and the expert reaches
    the objective and every rule goal (rooms behind doors, items in closed containers or already held)."""
    cmd = [sys.executable, str(REPO / "scripts" / "make_textworld_games.py"), "--out", str(tmp_path)]
    subprocess.run([*cmd, "--only", "tw-simple-dense", "tw-cooking-r2-g6"], check=True, capture_output=True, cwd=REPO)
    games = sorted(tmp_path.glob("*.z8"))
    assert len(games) == 2
    for game in games:
        env = TextWorldEnv(game)
        env.reset(seed=0)
        total = sum(env.step(command)[1] for command in env.walkthrough)
        assert total == env.max_score > 0, game
        goals = [env.objective, *env.rule_goals["go_to"], *env.rule_goals["take"], *env.rule_goals["open"]]
        assert len(goals) > 10
        for goal in goals:
            env.reset(options={"goal": goal})
            total = 0.0
            for _ in range(env.max_steps):
                _, reward, terminated, truncated, _ = env.step(env.expert_action())
                total += reward
                if terminated or truncated:
                    break
            assert terminated and total == (env.max_score if goal == env.objective else 1.0), (game, goal)
