"""The ALP goal curriculum (``sacglam/curriculum.py``): ALP and p against hand-computed outcomes, the eps schedule,
the state round trip, ``train.py curriculum=alp`` resumed mid-run row for row, two torchrun ranks holding the same
statistics and weights, and ``uniform`` (the default) touching nothing."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest

import envs  # noqa: F401 - registers the sacglam/ env ids
from sacglam.algos.eto.dpo import ETOConfig
from sacglam.algos.sac.learner import SACConfig
from sacglam.checkpoint import load_checkpoint
from sacglam.config import TrainConfig
from sacglam.curriculum import ALPCurriculum, CurriculumConfig, make_curriculum, resume_curriculum
from sacglam.distributed import rank_dir
from tests.test_data_parallel import SMALL as DP_SMALL
from tests.test_data_parallel import launch
from tests.test_train import SMALL, _comparable, read_metrics, run_train

CATS = ["grasp", "grow_plant", "grow_herbivore", "grow_carnivore"]


@dataclass
class Ep:
    goal_category: str
    success: bool


def feed(curriculum: ALPCurriculum, category: str, outcomes: str) -> None:
    """Feed ``outcomes`` ("0011": fail, fail, success, success) of ``category``, in order."""
    curriculum.update([Ep(category, c == "1") for c in outcomes])


def alp_config(**kw: Any) -> CurriculumConfig:
    return CurriculumConfig(kind="alp", **{"window": 2, "eps_start": 1.0, "eps_end": 0.2, "anneal_episodes": 10,
                                           **kw})


# ------------------------------------------------------------------------------------------------------- by hand


def test_alp_and_probabilities_by_hand() -> None:
    cur = ALPCurriculum(["a", "b", "c"], alp_config())
    feed(cur, "a", "001")  # 3 < 2 x 2 outcomes: no estimate yet
    assert cur.alp().tolist() == [0.0, 0.0, 0.0]
    assert cur.probabilities().tolist() == [1 / 3, 1 / 3, 1 / 3], "sum(ALP) == 0: uniform, whatever eps"
    feed(cur, "a", "1")  # a: older [0, 0] -> 0, recent [1, 1] -> 1: ALP 1
    feed(cur, "b", "1011")  # b: older [1, 0] -> 0.5, recent [1, 1] -> 1: ALP 0.5
    feed(cur, "c", "111")  # c: 3 outcomes, still 0
    assert cur.episodes == 11
    assert cur.alp().tolist() == [1.0, 0.5, 0.0]
    # 11 episodes >= anneal_episodes = 10: eps = 0.2. p = 0.2 / 3 + 0.8 * [1, 0.5, 0] / 1.5 = [3/5, 1/3, 1/15].
    assert cur.eps() == 0.2
    np.testing.assert_allclose(cur.probabilities(), [3 / 5, 1 / 3, 1 / 15], rtol=0, atol=1e-15)
    assert cur.weights() == dict(zip(["a", "b", "c"], cur.probabilities().tolist(), strict=True))
    # The windows slide: a's next success drops its oldest failure: older [0, 1] -> 0.5, recent [1, 1]: ALP 0.5.
    feed(cur, "a", "1")
    assert cur.alp().tolist() == [0.5, 0.5, 0.0]
    np.testing.assert_allclose(cur.probabilities(), [0.2 / 3 + 0.4, 0.2 / 3 + 0.4, 0.2 / 3], rtol=0, atol=1e-15)
    # A regression counts as much as progress (absolute LP): c goes 1, 1 -> 0, 0.
    feed(cur, "c", "00")  # c: older [1, 1] (its last two of 1, 1, 1), recent [0, 0]: ALP 1
    assert cur.alp().tolist() == [0.5, 0.5, 1.0]
    metrics = cur.metrics()
    assert metrics["curriculum/alp/c"] == 1.0 and metrics["curriculum/p/c"] == cur.probabilities()[2]
    assert sorted(metrics) == sorted([f"curriculum/{k}/{c}" for k in ("p", "alp") for c in "abc"])


def test_eps_schedule_exact() -> None:
    cur = ALPCurriculum(["a"], alp_config(eps_start=1.0, eps_end=0.5, anneal_episodes=4))
    seen = []
    for _ in range(6):
        seen.append(cur.eps())
        feed(cur, "a", "0")
    assert seen == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5], "linear over 4 episodes, then constant"
    default = ALPCurriculum(["a"], CurriculumConfig(kind="alp"))  # 1.0 -> 0.2 over 2000 episodes
    assert default.eps() == 1.0
    feed(default, "a", "0" * 2000)
    assert default.eps() == 0.2
    feed(default, "a", "0" * 500)
    assert default.eps() == 0.2
    assert ALPCurriculum(["a"], alp_config(anneal_episodes=0)).eps() == 0.2, "no annealing: eps_end from the start"


def test_unknown_category_and_bad_config_are_named() -> None:
    cur = ALPCurriculum(["a", "b"], alp_config())
    with pytest.raises(ValueError, match=r"goal category 'z'.*categories \['a', 'b'\]"):
        feed(cur, "z", "1")
    with pytest.raises(ValueError, match=r"curriculum\.kind='lp'"):
        CurriculumConfig(kind="lp")
    with pytest.raises(ValueError, match=r"curriculum\.eps_end=1\.5"):
        CurriculumConfig(kind="alp", eps_end=1.5)
    with pytest.raises(ValueError, match=r"curriculum=alp reweights.*algo=eto"):
        TrainConfig(algo=ETOConfig(), curriculum=CurriculumConfig(kind="alp"))


def test_state_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(0)
    episodes = [Ep(CATS[int(rng.integers(4))], bool(rng.random() < 0.4)) for _ in range(300)]
    whole = ALPCurriculum(CATS, alp_config(window=5, anneal_episodes=100))
    whole.update(episodes[:130])
    first = pickle.loads(pickle.dumps(whole.state_dict()))  # what a checkpoint stores
    resumed = ALPCurriculum(CATS, alp_config(window=5, anneal_episodes=100))
    resumed.load_state_dict(first)
    for start in range(130, 300, 17):  # both go on with the same episodes, p equal after every batch
        whole.update(episodes[start:start + 17])
        resumed.update(episodes[start:start + 17])
        assert resumed.probabilities().tolist() == whole.probabilities().tolist()
    assert resumed.state_dict() == whole.state_dict()
    assert whole.alp().sum() > 0
    with pytest.raises(ValueError, match=r"goal categories \['grasp'.*this run has \['grasp', 'grow_plant'\]"):
        ALPCurriculum(CATS[:2], alp_config()).load_state_dict(first)
    with pytest.warns(UserWarning, match="holds no curriculum state"):  # an older checkpoint: start empty
        resume_curriculum(ALPCurriculum(CATS, alp_config()), None, "old.pt")
    with pytest.raises(ValueError, match="written with curriculum=alp"):
        resume_curriculum(None, first, "alp.pt")
    resume_curriculum(None, None, "uniform.pt")  # uniform from uniform: nothing to do


def test_make_curriculum_checks_the_env() -> None:
    bitflip = gymnasium.make("sacglam/BitFlipText-v0").unwrapped
    with pytest.raises(ValueError, match=r"sacglam/BitFlipText-v0 \(BitFlipTextEnv\) has none"):
        make_curriculum(CurriculumConfig(kind="alp"), bitflip, "sacglam/BitFlipText-v0", {})
    playground = gymnasium.make("sacglam/PlaygroundText-v0", goal_categories=CATS[:2]).unwrapped
    with pytest.raises(ValueError, match=r"env\.kwargs\.goal_weights=\[1, 3\] is set too"):
        make_curriculum(CurriculumConfig(kind="alp"), playground, "p", {"goal_weights": [1, 3]})
    cur = make_curriculum(CurriculumConfig(kind="alp"), playground, "p", {})
    assert cur is not None and cur.categories == CATS[:2]


def test_uniform_is_the_default_and_uses_nothing() -> None:
    assert TrainConfig(algo=SACConfig()).curriculum.kind == "uniform"
    assert make_curriculum(CurriculumConfig(), object(), "any", {"goal_weights": [1]}) is None, "env not even read"
    # alp itself draws nothing: the global generators are untouched by updates and probabilities.
    before = pickle.dumps((random.getstate(), np.random.get_state()))
    cur = ALPCurriculum(CATS, alp_config())
    for i in range(40):
        feed(cur, CATS[i % 4], "01"[i % 3 == 0])
        cur.weights(), cur.metrics()
    assert pickle.dumps((random.getstate(), np.random.get_state())) == before


# -------------------------------------------------------------------------------------------------- real runs

ALP = ["curriculum=alp", "curriculum.window=2", "curriculum.anneal_episodes=20",
       f"env.kwargs.goal_categories=[{','.join(CATS)}]"]


def _p_rows(rows: list[dict[str, Any]]) -> list[list[float]]:
    return [[r[f"curriculum/p/{c}"] for c in CATS] for r in rows if "curriculum/p/grasp" in r]


@pytest.mark.integration
def test_resume_mid_run_draws_the_same_categories(tmp_path: Path) -> None:
    """curriculum=alp resumed from its middle checkpoint (the final one deleted, as if the run had died after the
    middle one): the same p rows, the same training successes per category (so the same categories drawn), the same
    final curriculum state."""
    args = [*SMALL, *ALP, "total_env_steps=320", "checkpoint.every=160", "checkpoint.keep=2", "eval.every=320",
            "seed=3"]
    result = run_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = read_metrics(tmp_path)
    final = tmp_path / "checkpoints" / f"step_{320:010d}.pt"
    ref_state = load_checkpoint(final, weights_only=False)["curriculum"]
    middle = load_checkpoint(tmp_path / "checkpoints" / f"step_{160:010d}.pt", weights_only=False)["curriculum"]
    p = _p_rows(reference)
    assert len(p) == len([r for r in reference if "charts/updates" in r]), "p on every training line"
    uniform = [0.25] * 4
    before = [q for q, r in zip(p, [r for r in reference if "curriculum/p/grasp" in r], strict=True)
              if r["step"] <= 160]
    assert any(q != uniform for q in before), "the curriculum has moved before the checkpoint it resumes from"
    assert any(q != uniform for q in p[len(before):]), "and moves after it"
    assert 0 < middle["episodes"] < ref_state["episodes"]

    final.unlink()
    result = run_train([*args, "resume=auto"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at env step 160" in result.stdout
    resumed = read_metrics(tmp_path)
    assert _p_rows(resumed) == p
    successes = lambda rows: [{k: v for k, v in r.items() if k.startswith("charts/success")} for r in rows]  # noqa: E731
    assert successes(resumed) == successes(reference)
    assert _comparable(resumed) == _comparable(reference)
    assert load_checkpoint(final, weights_only=False)["curriculum"] == ref_state


@pytest.mark.integration
def test_two_ranks_pool_episodes_and_draw_from_the_same_p(tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2: at every checkpoint both ranks hold the same curriculum state, which counts both
    ranks' episodes, and every env of both ranks holds the same weights: the p logged at that step."""
    # test_data_parallel's run (320 env steps, checkpoints every 80), all checkpoints kept; windows of 1 outcome and
    # scenes of 4 objects so that chance successes move p within so few episodes.
    args = [*DP_SMALL, *ALP, "curriculum.window=1", "env.kwargs.n_objects=4", "checkpoint.keep=0"]
    result = launch(args, tmp_path, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = {r["step"]: [r[f"curriculum/p/{c}"] for c in CATS] for r in read_metrics(tmp_path)
              if "curriculum/p/grasp" in r}
    moved = 0
    for step in (80, 160, 240, 320):
        states = [load_checkpoint(rank_dir(tmp_path, r) / "checkpoints" / f"step_{step:010d}.pt", weights_only=False)
                  for r in (0, 1)]
        assert states[0]["curriculum"] == states[1]["curriculum"], step
        assert states[0]["curriculum"]["episodes"] == sum(s["collector"]["episodes"] for s in states) > 0, "pooled"
        cur = ALPCurriculum(CATS, alp_config(window=1, anneal_episodes=20))
        cur.load_state_dict(states[0]["curriculum"])
        assert cur.probabilities().tolist() == logged[step]
        expected = np.cumsum(np.asarray(logged[step]) / np.sum(logged[step]))  # what set_goal_weights makes of p
        for state in states:
            for blob in state["envs"]["envs"]:
                np.testing.assert_array_equal(pickle.loads(blob)._weights, expected)
        moved += logged[step] != [0.25] * 4
    assert moved, "p moved away from uniform at some checkpoint"


@pytest.mark.integration
def test_uniform_run_logs_and_saves_no_curriculum(tmp_path: Path) -> None:
    result = run_train([*SMALL, "total_env_steps=32", "eval.every=0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(k.startswith("curriculum/") for r in read_metrics(tmp_path) for k in r)
    state = load_checkpoint(sorted((tmp_path / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
    assert state["curriculum"] is None
