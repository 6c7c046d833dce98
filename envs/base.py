"""The shared contract of every text environment (see docs/design/ENVIRONMENTS.md) and its error types.

Every env here is a ``gymnasium.Env[str, str]`` whose ``reset``/``step`` return text and whose ``info`` holds:

- ``info["goal"]``: the goal in words;
- ``info["goal_category"]``: the goal's category (for per-category statistics);
- ``info["admissible_actions"]``: the candidate action strings for the current observation (never empty);
- ``info["achieved_goals"]``: goals newly achieved by the last step (``[]`` at reset);
- ``info["invalid_action"]``: True when ``invalid_action="noop"`` turned a bad action into a wasted step.

``reset(options={"goal": ...})`` sets the goal; an unknown goal raises ``ValueError``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
from gymnasium import spaces


class InvalidActionError(ValueError):
    """An action string that is not admissible in the current state."""

    def __init__(self, action: str, admissible: Sequence[str]) -> None:
        self.action = action
        self.admissible = list(admissible)
        super().__init__(f"action {action!r} is not admissible here; admissible actions: {self.admissible}")


class NoAdmissibleActionsError(RuntimeError):
    """The environment reached a state with no admissible action (a bug in the env or its wrapper)."""


def equality_reward(achieved_goals: Sequence[str], goal: str) -> float:
    """The default reward: 1 iff ``goal`` is among the goals newly achieved by the step, else 0. Pure."""
    return 1.0 if goal in achieved_goals else 0.0


class TextEnvBase(gym.Env[str, str]):
    """Base class holding what all text envs share: spaces, action checking and the pure reward.

    Subclasses implement ``reset``, ``step``, ``goal_category``, ``goal_step_limit`` and ``expert_action``, and call
    ``self._check_action(action, admissible)`` at the top of ``step``.
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"]}  # noqa: RUF012 - gymnasium's convention
    goal_categories: list[str]  # the env's goal categories (evaluation resets with each)

    def __init__(self, invalid_action: str = "raise", max_text_length: int = 4096) -> None:
        if invalid_action not in ("raise", "noop"):
            raise ValueError(f"invalid_action must be 'raise' or 'noop', got {invalid_action!r}")
        self.invalid_action = invalid_action
        self.observation_space = spaces.Text(max_length=max_text_length, charset=string.printable)
        self.action_space = spaces.Text(max_length=max_text_length, charset=string.printable)

    @staticmethod
    def compute_reward(achieved_goals: Sequence[str], goal: str) -> float:
        """Reward of a step that newly achieved ``achieved_goals`` under ``goal``. A pure function (HER calls it)."""
        return equality_reward(achieved_goals, goal)

    def _check_action(self, action: str, admissible: Sequence[str]) -> bool:
        """Return True when ``action`` is admissible; raise or return False (noop mode) otherwise."""
        if action in admissible:
            return True
        if self.invalid_action == "raise":
            raise InvalidActionError(action, admissible)
        return False

    @staticmethod
    def _require_actions(admissible: Sequence[str], where: str) -> list[str]:
        if not admissible:
            raise NoAdmissibleActionsError(f"{where}: no admissible action in this state")
        return list(admissible)

    def goal_category(self, goal: str) -> str:
        """The category of ``goal`` (e.g. ``grow_plant``); pure."""
        raise NotImplementedError

    def goal_step_limit(self, goal: str) -> int | None:
        """The step limit of an episode with ``goal`` (None when the env has one fixed limit); pure."""
        raise NotImplementedError

    def expert_action(self) -> str:
        """An action of the built-in expert for the current state and goal."""
        raise NotImplementedError
