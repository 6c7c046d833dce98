"""BabyAI-Text: minigrid's BabyAI levels described in words, as in GLAM (Carta et al., 2023, section 3).

The agent sees one sentence per visible object and per wall straight ahead/left/right in its 7x7 egocentric view
(``You see a wall 2 steps forward``, ``You see a purple key 1 step left and 2 steps forward``, ``You carry a blue
ball``) and acts with six text actions. The goal is the level's mission text.

    env = BabyAITextEnv(level="BabyAI-GoToLocal-v0", reward_scale=20.0)  # GLAM trained with the reward x 20
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.expert_action())

Rewards: ``reward_scale * (1 - 0.9 * t / T_max)`` on success at step ``t`` (minigrid's own formula, ``T_max`` the
level's ``max_steps``), else 0. ``compute_reward`` (what HER calls, without the env) is the base class's static
``1.0 iff goal in achieved_goals``: it cannot know ``t`` nor the instance's scale, so relabelled transitions get an
undiscounted, unscaled success reward. Train with ``reward_scale=1`` when mixing env and HER rewards, or scale both.
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import TextEnvBase

ACTIONS: tuple[str, ...] = ("turn left", "turn right", "go forward", "pick up", "drop", "toggle")
"""The six text actions, in minigrid's action order (left=0, right=1, forward=2, pickup=3, drop=4, toggle=5)."""

MINIGRID_DONE = 6  # minigrid's "done" action: a no-op that costs a step (used for invalid_action="noop")

# Encoded object types (minigrid.core.constants.OBJECT_TO_IDX) and their names; copied so that this pure text
# function needs no minigrid import.
_UNSEEN, _EMPTY, _WALL, _DOOR = 0, 1, 2, 4
_IDX_TO_OBJECT = {3: "floor", 4: "door", 5: "key", 6: "ball", 7: "box", 8: "goal", 9: "lava"}
_IDX_TO_COLOR = {0: "red", 1: "green", 2: "blue", 3: "purple", 4: "yellow", 5: "grey"}
_IDX_TO_DOOR_STATE = {0: "open", 1: "closed", 2: "locked"}
_GOAL_OBJECT_TYPES = ("key", "ball", "box", "door")  # what a BabyAI "go to" can target

GOAL_CATEGORIES: tuple[str, ...] = ("go_to", "pick_up", "open", "put_next", "sequence")
"""Every category a BabyAI mission can have, in a fixed order (``env.goal_categories`` keeps this order)."""

MIXED_TRAIN_LOCAL: tuple[str, ...] = (
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
    "BabyAI-PutNextLocal-v0",
    "BabyAI-OpenDoorLoc-v0",
)
"""An approximation of GLAM's MixedTrainLocal (which is not a minigrid id): pass it as ``level`` to mix levels."""

_GOAL_EXAMPLES = (
    "'go to the red ball', 'pick up a blue key', 'put the red ball next to the green box', 'open the red door'"
)


def _steps(n: int, direction: str) -> str:
    return f"{n} step{'s' if n > 1 else ''} {direction}"


def describe_view(image: np.ndarray, carrying: tuple[str, str] | None = None) -> list[str]:
    """GLAM's sentences for one egocentric view. Pure (no env needed), so it can be checked on hand-built views.

    The agent stands at the bottom-middle cell ``(W // 2, H - 1)`` facing "up" (decreasing ``j``). A wall is named
    only straight forward, left or right, and only when no object stands between it and the agent (GLAM's rule);
    every other visible thing (doors with their state, keys, balls, boxes, ...) gets its relative position.

    Args:
        image: [W, H, 3] int array, minigrid's encoded view (``obs["image"]``): channel 0 object type, 1 colour,
            2 state; indexed ``image[x, y]`` with x to the right and y towards the back.
        carrying: ``(color, type)`` of the carried object, or None.

    Returns:
        The sentences, in a fixed order: carried object, walls (forward, left, right), then objects by column
        left to right and row far to near.
    """
    width, height = image.shape[0], image.shape[1]
    ax, ay = width // 2, height - 1
    kinds = image[:, :, 0]
    sentences: list[str] = []
    if carrying is not None:
        sentences.append(f"You carry a {carrying[0]} {carrying[1]}")
    # Walls straight ahead, left and right: the first non-empty visible cell on the line, if it is a wall.
    # Unseen cells are skipped over, as in GLAM.
    for direction, cells in (
        ("forward", [(ax, j) for j in range(ay - 1, -1, -1)]),
        ("left", [(i, ay) for i in range(ax - 1, -1, -1)]),
        ("right", [(i, ay) for i in range(ax + 1, width)]),
    ):
        for distance, (i, j) in enumerate(cells, start=1):
            kind = int(kinds[i, j])
            if kind in (_UNSEEN, _EMPTY):
                continue
            if kind == _WALL:
                sentences.append(f"You see a wall {_steps(distance, direction)}")
            break
    for i in range(width):
        for j in range(height):
            kind = int(kinds[i, j])
            if (i, j) == (ax, ay) or kind in (_UNSEEN, _EMPTY, _WALL):
                continue  # the agent's own cell holds what it carries, already described
            name = _IDX_TO_OBJECT.get(kind, f"object {kind}")
            color = _IDX_TO_COLOR.get(int(image[i, j, 1]), "")
            if kind == _DOOR:
                state = _IDX_TO_DOOR_STATE.get(int(image[i, j, 2]), "closed")
                article = "an" if state == "open" else "a"
                what = f"{article} {state} {color} door"
            else:
                what = f"a {color} {name}"
            dx, dy = i - ax, ay - j
            side = _steps(abs(dx), "left" if dx < 0 else "right")
            if dx == 0:
                where = _steps(dy, "forward")
            elif dy == 0:
                where = side
            else:
                where = f"{side} and {_steps(dy, 'forward')}"
            sentences.append(f"You see {what} {where}")
    return sentences


def mission_category(goal: str) -> str:
    """The category of a BabyAI mission from its verb (``go_to``, ``pick_up``, ``open``, ``put_next``, ``sequence``).

    Raises:
        ValueError: the text is not a BabyAI mission.
    """
    if " then " in goal or " after you " in goal or " and " in goal:
        return "sequence"
    for prefix, category in (("go to ", "go_to"), ("pick up ", "pick_up"), ("open ", "open"), ("put ", "put_next")):
        if goal.startswith(prefix):
            return category
    raise ValueError(f"{goal!r} is not a BabyAI mission; missions look like {_GOAL_EXAMPLES}")


class BabyAITextEnv(TextEnvBase):
    """A BabyAI level (or a uniform mixture of levels) as a text environment.

    ``info`` holds, besides the base contract (goal, goal_category, admissible_actions, achieved_goals,
    invalid_action): ``level`` (the minigrid id played) and ``step`` (minigrid's step count).

    Achieved goals of a step (for HER): ``go to the <color> <type>`` when the agent newly faces an object in the
    adjacent cell, ``pick up the <color> <type>`` when it picks one up, ``open the <color> door`` when it opens one,
    ``put the <color> <type> next to the <color> <type>`` for each object next to where it drops one, and the
    mission itself on the step minigrid reports success (missions may say ``a ball`` or ``on your left``, which
    the rules do not spell).
    """

    def __init__(
        self,
        level: str | Sequence[str] = "BabyAI-GoToLocal-v0",
        reward_scale: float = 1.0,
        history: int = 0,
        invalid_action: str = "raise",
        goal_tries: int = 5000,
    ) -> None:
        """Build the minigrid level(s).

        Args:
            level: a minigrid BabyAI id (e.g. ``BabyAI-GoToLocal-v0``, ``BabyAI-PickupLoc-v0``) or a sequence of
                ids to sample uniformly at each reset (e.g. ``MIXED_TRAIN_LOCAL``).
            reward_scale: multiplies the success reward (GLAM used 20).
            history: how many previous observation/action pairs to prepend to the observation text (GLAM's prompt
                had 2 actions and 3 observations, i.e. ``history=2``); 0 gives the bare current sentences.
            invalid_action: ``"raise"`` (InvalidActionError) or ``"noop"`` (a wasted step, ``info["invalid_action"]``).
            goal_tries: how many levels ``reset(options={"goal"|"goal_category": ...})`` samples before giving up.
        """
        super().__init__(invalid_action=invalid_action)
        import minigrid  # noqa: F401 - registers the BabyAI ids with gymnasium

        self.levels = [level] if isinstance(level, str) else list(level)
        if not self.levels:
            raise ValueError("level must name at least one minigrid BabyAI id, e.g. 'BabyAI-GoToLocal-v0'")
        self._envs: dict[str, Any] = {}
        for name in self.levels:
            try:
                self._envs[name] = gym.make(name).unwrapped
            except gym.error.Error as err:
                known = sorted(e for e in gym.registry if e.startswith("BabyAI-"))[:8]
                raise ValueError(f"unknown BabyAI level {name!r} ({err}); minigrid ids look like {known}") from err
        if reward_scale <= 0:
            raise ValueError(f"reward_scale must be positive, got {reward_scale}")
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        self.reward_scale = float(reward_scale)
        self.history = history
        self.goal_tries = goal_tries
        # Which categories the level(s) produce, and the step limit per category, from a few fixed-seed samples
        # (a private seed, so the env's own random stream is untouched).
        limits: dict[str, int] = {}
        for env in self._envs.values():
            for seed in range(16):
                with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints every rejected sample
                    env.reset(seed=10_000 + seed)
                category = mission_category(env.mission)
                limits[category] = max(limits.get(category, 0), int(env.max_steps))
        self.goal_categories: list[str] = [c for c in GOAL_CATEGORIES if c in limits]
        self._limits = limits
        self._max_limit = max(int(env.max_steps) for env in self._envs.values())
        self._env: Any = None  # the minigrid env of the current episode
        self._level = ""
        self._goal = ""
        self._past: deque[tuple[str, str]] = deque(maxlen=max(history, 1))
        self._current = ""  # current sentences, without history
        self._bot: Any = None
        self._bot_step = -1  # minigrid step count at which the bot last replanned
        self._last_action = -1  # minigrid id of the action the last step executed
        self._expert_cache: tuple[int, str] | None = None

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode: sample a level (and a layout) from the env's random stream.

        Options:
            goal: resample layouts (successive seeds from the env rng, at most ``goal_tries``) until the mission
                equals it; ValueError naming it otherwise.
            goal_category: resample until the mission has that category.
        """
        super().reset(seed=seed)
        options = options or {}
        goal: str | None = options.get("goal")
        category: str | None = options.get("goal_category")
        if goal is not None:
            category = self.goal_category(goal)  # raises on text that is no mission
            if category not in self.goal_categories:
                raise ValueError(
                    f"goal {goal!r} (category {category!r}) cannot occur in {self.levels}; "
                    f"their categories are {self.goal_categories}"
                )
        elif category is not None and category not in self.goal_categories:
            raise ValueError(f"unknown goal_category {category!r} for {self.levels}; known: {self.goal_categories}")
        tries = self.goal_tries if (goal is not None or category is not None) else 1
        seen: list[str] = []
        for _ in range(tries):
            self._level = self.levels[int(self.np_random.integers(len(self.levels)))]
            self._env = self._envs[self._level]
            with contextlib.redirect_stdout(io.StringIO()):
                obs, _ = self._env.reset(seed=int(self.np_random.integers(2**31 - 1)))
            mission = str(self._env.mission)
            if goal is None and category is None:
                break
            if mission == goal or (goal is None and mission_category(mission) == category):
                break
            if len(seen) < 5 and mission not in seen:
                seen.append(mission)
        else:
            wanted = f"goal {goal!r}" if goal is not None else f"a goal of category {category!r}"
            raise ValueError(f"no layout of {self.levels} with {wanted} in {tries} tries; missions seen: {seen}")
        self._goal = mission
        self._past.clear()
        self._bot, self._bot_step, self._last_action, self._expert_cache = None, -1, -1, None
        self._current = self._sentences(obs)
        return self._text(), self._info([], invalid=False)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Apply one of the six text actions; see the class docstring for rewards and achieved goals."""
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        valid = self._check_action(action, ACTIONS)
        env = self._env
        front_before = env.grid.get(*env.front_pos)
        was_open = bool(getattr(front_before, "is_open", False))
        carried_before = env.carrying
        action_id = ACTIONS.index(action) if valid else MINIGRID_DONE
        obs, reward, terminated, truncated, _ = env.step(action_id)
        self._last_action = action_id
        achieved = self._achieved(front_before, was_open, carried_before, action_id)
        if terminated and reward > 0 and self._goal not in achieved:
            achieved.append(self._goal)
        self._past.append((self._current, action))
        self._current = self._sentences(obs)
        info = self._info(achieved, invalid=not valid)
        return self._text(), float(reward) * self.reward_scale, bool(terminated), bool(truncated), info

    def close(self) -> None:
        for env in self._envs.values():
            env.close()

    # ------------------------------------------------------------------------------------------ contract API
    def goal_category(self, goal: str) -> str:
        """The mission's category from its verb; ValueError for text that is no BabyAI mission. Pure."""
        return mission_category(goal)

    def goal_step_limit(self, goal: str) -> int | None:
        """minigrid's ``max_steps`` of the level(s) producing the goal's category (the largest one). Pure."""
        return self._limits.get(mission_category(goal), self._max_limit)

    def expert_action(self) -> str:
        """The action of minigrid's ``BabyAIBot`` for the current state (cached: one replan per step).

        The bot is told the action actually taken since its last suggestion, so it also guides an agent that
        deviates (DAgger-style); when it was not consulted at the previous step it is rebuilt from the current
        state (it then forgets what it had seen, which only costs exploration steps). The bot's "done" becomes a
        text action that changes nothing (``drop`` with empty hands, else ``pick up`` with full ones).
        """
        if self._env is None:
            raise RuntimeError("call reset() before expert_action()")
        from minigrid.utils.baby_ai_bot import BabyAIBot

        step = int(self._env.step_count)
        if self._expert_cache is not None and self._expert_cache[0] == step:
            return self._expert_cache[1]
        if self._bot is not None and self._bot_step == step - 1:
            suggestion = self._bot.replan(self._last_action)
        else:
            self._bot = BabyAIBot(self._env)
            suggestion = self._bot.replan()
        self._bot_step = step
        suggestion = int(suggestion)
        if suggestion < len(ACTIONS):
            text = ACTIONS[suggestion]
        else:
            text = "pick up" if self._env.carrying is not None else "drop"
        self._expert_cache = (step, text)
        return text

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def mission(self) -> str:
        """The current episode's mission (its goal)."""
        return self._goal

    def _sentences(self, obs: dict[str, Any]) -> str:
        carried = self._env.carrying
        carrying = None if carried is None else (str(carried.color), str(carried.type))
        sentences = describe_view(np.asarray(obs["image"]), carrying)
        return ", ".join(sentences) if sentences else "You see nothing"

    def _text(self) -> str:
        if self.history == 0:
            return self._current
        past = list(self._past)[-self.history :]
        lines: list[str] = []
        for k, (observation, action) in enumerate(past):
            offset = len(past) - k
            lines += [f"Observation -{offset}: {observation}", f"Action -{offset}: {action}"]
        lines.append(f"Observation 0: {self._current}")
        return "\n".join(lines)

    def _achieved(self, front_before: Any, was_open: bool, carried_before: Any, action_id: int) -> list[str]:
        env = self._env
        achieved: list[str] = []
        front_pos = env.front_pos
        front = env.grid.get(*front_pos)
        if front is not None and front.type in _GOAL_OBJECT_TYPES and front is not front_before:
            achieved.append(f"go to the {front.color} {front.type}")
        if env.carrying is not None and env.carrying is not carried_before:
            achieved.append(f"pick up the {env.carrying.color} {env.carrying.type}")
        if front is not None and front.type == "door" and front is front_before and front.is_open and not was_open:
            achieved.append(f"open the {front.color} door")
        if action_id == ACTIONS.index("drop") and carried_before is not None and env.carrying is None:
            x, y = int(front_pos[0]), int(front_pos[1])
            for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if not (0 <= nx < env.grid.width and 0 <= ny < env.grid.height):
                    continue
                other = env.grid.get(nx, ny)
                if other is not None and other.type in ("key", "ball", "box"):
                    achieved.append(
                        f"put the {carried_before.color} {carried_before.type} next to the {other.color} {other.type}"
                    )
        return achieved

    def _info(self, achieved: list[str], *, invalid: bool) -> dict[str, Any]:
        return {
            "goal": self._goal,
            "goal_category": mission_category(self._goal),
            "admissible_actions": list(ACTIONS),
            "achieved_goals": achieved,
            "invalid_action": invalid,
            "level": self._level,
            "step": int(self._env.step_count),
        }
