"""scripts/shortcut_eval.py: the shortcut test by hand, the scene filter on the real env, and a run end to end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import gymnasium
import pytest

import envs  # noqa: F401  (registers the envs)
from tests.test_train import run_train

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_shortcut_eval", ROOT / "scripts" / "shortcut_eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


se = _load()


def test_has_shortcut_by_hand() -> None:
    assert se.has_shortcut(("baby cow", "carrot", "water"), "grow_herbivore")  # a grown plant
    assert not se.has_shortcut(("baby cow", "carrot seed", "water"), "grow_herbivore")
    assert se.has_shortcut(("baby lion", "cow", "carrot seed"), "grow_carnivore")  # a grown herbivore
    assert not se.has_shortcut(("baby lion", "baby cow", "carrot", "water"), "grow_carnivore")  # a plant is not food


@pytest.mark.parametrize("shortcut", [True, False])
def test_scene_filter_returns_only_the_asked_scenes_reproducibly(shortcut: bool) -> None:
    def make() -> object:
        env = gymnasium.make("sacglam/PlaygroundText-v0", goal_categories=["grow_herbivore", "grow_carnivore"],
                             grown_distractors=0.5)
        return se.SceneFilter(env.unwrapped, shortcut)

    a, b = make(), make()
    for seed in range(20):
        for cat in ("grow_herbivore", "grow_carnivore"):
            obs_a, _ = a.reset(seed=seed, options={"goal_category": cat})  # type: ignore[attr-defined]
            obs_b, _ = b.reset(seed=seed, options={"goal_category": cat})  # type: ignore[attr-defined]
            assert obs_a == obs_b
            assert se.has_shortcut(a.state.objects, cat) == shortcut  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="goal categories"):
        a.reset(seed=0, options={"goal_category": "grasp"})  # type: ignore[attr-defined]


@pytest.mark.integration
def test_shortcut_eval_on_a_short_run(tmp_path: Path) -> None:
    run = run_train(["experiment=playground_sac_her", "env.num_envs=4", "total_env_steps=128", "learning_starts=32",
                     "batch_size=16", "eval.every=0", "eval.episodes_per_category=2", "eval.num_envs=2",
                     "env.kwargs.goal_categories=[grasp,grow_plant,grow_herbivore,grow_carnivore]",
                     "~env.heldout_kwargs.split", "env.corpus_episodes=10", "threads=1"], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "shortcut_eval.py"), str(tmp_path / "run"),
                          "--episodes", "4", "--num-envs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| with")]
    assert [r.split(" | ")[0] for r in rows] == ["| with the shortcut", "| without the shortcut"]
    for r in rows:
        values = [float(v) for v in r.strip(" |").split(" | ")[1:]]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
