"""TextWorld suites: the train / held-out split of games (pure), and the suite env on real coin-collector games."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from envs.textworld_suite import TextWorldSuiteEnv, resolve_games, split_games
from sacglam.episodes import EpisodeRecord
from sacglam.relabel import GoalSpace, RuleSource

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- the split


@pytest.mark.parametrize(("n", "heldout", "n_heldout"), [(8, 2, 2), (8, 0.25, 2), (8, 0.1, 1), (3, 1, 1), (5, 0, 0)])
def test_split_never_shares_a_game_and_covers_all(n: int, heldout: float, n_heldout: int) -> None:
    paths = [f"g/tw-s{k}.z8" for k in range(n)]
    train, held = split_games(paths, heldout)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(paths)
    assert len(held) == n_heldout
    assert held == sorted(paths)[n - n_heldout :]  # the last of the sorted names


def test_split_does_not_depend_on_the_order_given() -> None:
    paths = [f"g/tw-s{k}.z8" for k in range(6)]
    assert split_games(paths, 2) == split_games(paths[::-1], 2) == (paths[:4], paths[4:])


@pytest.mark.parametrize(("heldout", "fragment"), [(-1, "count >= 0"), (2.5, "count >= 0"), (4, "leaves none")])
def test_split_refuses_bad_counts(heldout: float, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        split_games([f"g{k}.z8" for k in range(4)], heldout)


def test_resolve_games_from_a_folder_a_pattern_and_a_list(tmp_path: Path) -> None:
    for name in ("b.z8", "a.z8", "c.json"):
        (tmp_path / name).touch()
    expected = [str(tmp_path / "a.z8"), str(tmp_path / "b.z8")]
    assert resolve_games(tmp_path) == expected
    assert resolve_games(str(tmp_path / "*.z8")) == expected
    assert resolve_games([str(tmp_path / "b.z8"), str(tmp_path / "a.z8"), str(tmp_path / "a.z8")]) == expected
    with pytest.raises(FileNotFoundError, match=r"make_textworld_games\.py"):
        resolve_games(str(tmp_path / "none-*.z8"))


# ---------------------------------------------------------------------------------------------- real games


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three level-5 coin-collector games (tw-make seeds 1-3), made by the suite script (about 10-20 s)."""
    pytest.importorskip("textworld")
    out = tmp_path_factory.mktemp("suite")
    cmd = [sys.executable, str(REPO / "scripts" / "make_textworld_games.py"), "--out", str(out), "--seeds", "1", "2",
           "3", "--only", "tw-coin_collector-l5"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    assert len(list(out.glob("*.z8"))) == 3
    return out


@pytest.mark.integration
def test_suite_envs_play_only_their_split(suite: Path) -> None:
    pattern = str(suite / "*.z8")
    train = TextWorldSuiteEnv(pattern, split="train", heldout=1)
    held = TextWorldSuiteEnv(pattern, split="heldout", heldout=1)
    played_train = {train.reset(seed=s)[1]["game"] for s in range(24)}
    played_held = {held.reset(seed=s)[1]["game"] for s in range(8)}
    assert played_train == {str(suite / f"tw-coin_collector-l5-s{k}.z8") for k in (1, 2)}  # both, never s3
    assert played_held == {str(suite / "tw-coin_collector-l5-s3.z8")}
    # Goal spaces by split: the training games' objectives for "train", the held-out game's for the rest.
    assert set(train.goal_space("objective", "train")) == {g.objective for g in train.games}
    assert train.goal_space("objective", "test") == [held.games[0].objective]
    assert train.goal_categories == ["objective", "go_to", "take"]
    # A goal picks a game that has it; a goal no training game has is refused, naming it.
    _, info = train.reset(seed=0, options={"goal": train.games[1].objective})
    assert info["game"] == train.games[1].game_path and info["goal"] == train.games[1].objective
    with pytest.raises(ValueError, match="no goal of the train games"):
        train.reset(options={"goal": held.games[0].objective})
    for env in (train, held):
        env.close()


@pytest.mark.integration
def test_rule_goals_of_a_scripted_suite_episode(suite: Path) -> None:
    """Seed 1's walkthrough through the suite env: the yaml rules find the rooms and the coin, checked by hand
    (the rooms were read off the game's text: cookhouse -> spare room -> studio -> dish-pit -> cookery)."""
    env = TextWorldSuiteEnv(str(suite / "*.z8"), split="all")
    game = next(g for g in env.games if g.game_path.endswith("-s1.z8"))
    obs, info = env.reset(seed=0, options={"goal": game.objective})
    observations, candidates, actions = [obs], [], []
    for command in game.walkthrough:
        candidates.append(list(info["admissible_actions"]))
        actions.append(candidates[-1].index(command))
        obs, reward, terminated, _, info = env.step(command)
        observations.append(obs)
    assert terminated and info["won"] and reward == 1.0
    steps = len(actions)
    ep = EpisodeRecord(id="e0k0", env_index=0, goal=game.objective, goal_category="objective",
                       observations=observations, candidates=candidates, actions=actions, rewards=[0.0] * steps,
                       achieved=[[] for _ in range(steps)], policy_version=[0] * steps, terminated=True,
                       truncated=False, success=True)
    rules = yaml.safe_load((REPO / "conf" / "env" / "textworld_suite.yaml").read_text())["rules"]
    (result,) = RuleSource(rules, GoalSpace.from_env(env))([ep])
    assert result.achieved == [["go to the spare room"], ["go to the studio"], ["go to the dish-pit"],
                               ["go to the cookery"], ["take the coin"]]
    assert result.dropped == 0
    env.close()


@pytest.mark.integration
@pytest.mark.parametrize("preset", ["textworld_suite_sac_her", "textworld_suite_sac", "textworld_suite_ppo",
                                    "textworld_suite_eto"])
def test_suite_presets_train_and_evaluate_both_splits(preset: str, suite: Path, tmp_path: Path) -> None:
    from tests.test_train import SMALL, read_metrics, run_train

    small = [o for o in SMALL if not o.startswith(("batch_size", "learning_starts"))] if "ppo" in preset else SMALL
    on_policy = ["algo.rollout_steps=8", "algo.minibatch_size=16"] if "ppo" in preset else []
    if "eto" in preset:  # rounds of 4 tasks, the expert's warm start on 4 episodes
        small = [o for o in SMALL if not o.startswith(("batch_size", "learning_starts"))]
        on_policy = ["algo.tasks=4", "algo.warm_start_episodes=4", "algo.sft_epochs=1", "algo.epochs=1"]
    result = run_train([f"experiment={preset}", f"env.kwargs.games={suite}/*.z8", "env.kwargs.heldout=1",
                        "env.vector=sync", *small, *on_policy, "env.kwargs.max_steps=8", "total_env_steps=160"],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    final = [m for m in metrics if "eval/greedy/success/objective" in m][-1]
    assert 0.0 <= final["eval/heldout/greedy/success/objective"] <= 1.0  # the held-out game was evaluated
    if preset == "textworld_suite_sac_her":  # rule-sourced achieved goals reached the buffer
        assert max(m.get("relabel/accepted", 0.0) for m in metrics) > 0


def test_the_tuned_ppo_preset_sets_the_swept_keys() -> None:
    """experiment=textworld_suite_ppo carries the TextWorld sweep's choice (lr x rollout_steps) and the target KL
    that kept its 5 seeds from collapsing, not algo=ppo's."""
    from tests.test_config_validation import _compose

    tuned, default = _compose(["experiment=textworld_suite_ppo"]), _compose(["algo=ppo"])
    assert (tuned.algo.lr, tuned.algo.rollout_steps, tuned.algo.target_kl) == (3e-3, 16, 0.05)
    assert (default.algo.lr, default.algo.rollout_steps, default.algo.target_kl) == (1e-3, 32, 0.0)
    assert tuned.algo.minibatch_size == default.algo.minibatch_size  # 16 steps x 8 envs still fill a minibatch
