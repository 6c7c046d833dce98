"""scripts/buffer_census.py: exact counts on a hand-made buffer state."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("_buffer_census", ROOT / "scripts" / "buffer_census.py")
assert spec is not None and spec.loader is not None
census_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(census_mod)


def test_census_counts_only_written_rows() -> None:
    ids = {"Grasp a": 0, "Grow b": 1, "Grasp c": 2}
    # 3 rows x 2 envs were allocated, 2 rows written (pos = 2): row 2 holds stale values that must not count.
    goal = torch.tensor([[0, 1], [1, 1], [2, 2]])
    reward = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    achieved = torch.full((3, 2, 2), -1)
    achieved[0, 0, 0] = 0  # Grasp a achieved
    achieved[1, 1, :] = torch.tensor([1, 2])  # Grow b and Grasp c at once
    achieved[2, 0, 0] = 1  # stale row
    state = {"buffer": {"pos": 2, "goal": goal, "reward": reward, "achieved": achieved}, "encoder": {"goal_ids": ids}}
    out = census_mod.census(state)
    assert out["achieved"] == {"Grasp a": 1, "Grow b": 1, "Grasp c": 1}
    assert out["pursued"] == {"Grasp a": 1, "Grow b": 3}
    assert out["rewarded"] == {"Grasp a": 1, "Grow b": 1}
    assert census_mod.by_first_word(out["achieved"]) == {"Grasp": 2, "Grow": 1}


def test_census_reads_the_sac_learner_layout_and_groups_by_category() -> None:
    ids = {"Grasp a": 0, "Grow b": 1}
    buffer = {"pos": 1, "goal": torch.tensor([[0, 1]]), "reward": torch.tensor([[1.0, 0.0]]),
              "achieved": torch.tensor([[[0], [1]]])}
    out = census_mod.census({"learner": {"buffer": buffer, "encoder": {"goal_ids": ids}}})
    assert out["achieved"] == {"Grasp a": 1, "Grow b": 1}
    category = {"Grasp a": "grasp", "Grow b": "grow_plant"}.__getitem__
    assert census_mod.by_category(out["pursued"], category) == {"grasp": 1, "grow_plant": 1}
