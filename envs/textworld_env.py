"""TextWorld games (generated with ``tw-make``) as a gymnasium text environment.

    env = TextWorldEnv(game="games/tw-coin_collector-l5-s1.z8", max_steps=50)
    obs, info = env.reset(seed=0)                           # goal: the game's objective
    obs, info = env.reset(options={"goal": "take the coin"})  # or a rule goal (reward 1 when achieved)

A wrapper over the env ``textworld.gym`` builds (``textworld.start`` + ``Filter``), which still has the old 4-tuple
``step`` and reports the *cumulative* score: the reward is the score difference. Only the cheap infos are requested
on the hot path (admissible commands, won/lost, the static ``Game``); ``policy_commands`` (quest tracking, the slow
part) is switched on the first time ``expert_action`` is called, by rebuilding the game and replaying the episode.

Achieved goals (for HER) come from cheap rules over the executed command and the feedback text, no game facts:

- ``take the <item>`` when a ``take <item> [from <holder>]`` command ran (an admissible take always succeeds);
- ``open the <thing>`` when an ``open <thing>`` command ran;
- ``go to the <room>`` when the feedback's room heading (``-= Kitchen =-``) names a room other than the last one;
- the objective itself on the step the game is won.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

from envs.base import TextEnvBase

GOAL_CATEGORIES: tuple[str, ...] = ("objective", "go_to", "take", "open")
"""``objective``: the game's own quest (reward = score difference); the others are rule goals (reward 1)."""

MAKE_GAMES_HINT = "python scripts/make_textworld_games.py"

_HEADING = re.compile(r"^-= (.+?) =-$", re.MULTILINE)
_BANNER_LINE = re.compile(r"^[\s_|\\/$<>]*[_|$][\s_|\\/$<>]*$")  # the ASCII-art title: only these characters
_PORTABLE_TYPES = ("o", "f", "k")  # TextWorld entity types a player can take: object, food, key
_OPENABLE_TYPES = ("c", "d")  # container, door


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence one warning: textworld asks its jericho layer for valid actions, which warns and returns [] for
    TextWorld-made games, then computes the admissible commands itself (state tracking)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unable to find valid actions in an unsupported game")
        yield


def clean_text(raw: str) -> str:
    """TextWorld output without the ASCII-art banner, the trailing prompt/status line and runs of blank lines.

    Args:
        raw: the interpreter's text, e.g. ``"\\n\\n-= Kitchen =-\\nYou are in a kitchen.\\n\\n>   -= Kitchen =-0/1"``.

    Returns:
        The text, lines stripped, at most one blank line in a row (``"-= Kitchen =-\\nYou are in a kitchen."``).
    """
    cut = raw.rfind("\n>")
    if cut >= 0:
        raw = raw[:cut]
    lines: list[str] = []
    for line in raw.splitlines():
        if _BANNER_LINE.match(line):
            continue
        line = line.strip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def goal_category(goal: str) -> str:
    """``go_to``/``take``/``open`` from a rule goal's first words (``go to the``, ``take the``, ``open the``), else
    ``objective`` (a game's objective is free text). Pure."""
    for prefix, category in (("go to the ", "go_to"), ("take the ", "take"), ("open the ", "open")):
        if goal.startswith(prefix):
            return category
    return "objective"


def _command_goal(command: str) -> str | None:
    """The rule goal a command achieves by running (``take X from Y`` -> ``take the X``), if any."""
    if command.startswith("take "):
        return "take the " + command[len("take ") :].split(" from ")[0]
    if command.startswith("open "):
        return "open the " + command[len("open ") :]
    return None


class TextWorldEnv(TextEnvBase):
    """One TextWorld game as a text env.

    ``info`` holds, besides the base contract: ``score`` (cumulative), ``max_score``, ``won``, ``lost``.

    Goals: the game's ``objective`` (the default; terminated when the game is won or lost, reward = score
    difference) or a rule goal from ``self.rule_goals`` (reward 1 and terminated when it is achieved; the episode
    also ends if the game ends first). Truncated after ``max_steps`` steps.
    """

    def __init__(self, game: str | os.PathLike[str], max_steps: int = 50, invalid_action: str = "raise") -> None:
        """Open the game.

        Args:
            game: path to a ``.z8``/``.ulx`` game made by ``tw-make`` (its ``.json`` must lie next to it).
            max_steps: truncation limit per episode.
            invalid_action: ``"raise"`` (InvalidActionError) or ``"noop"`` (a wasted step, nothing sent to the game).

        Raises:
            FileNotFoundError: the game or its ``.json`` is missing (names the path and the generation script).
        """
        super().__init__(invalid_action=invalid_action)
        path = os.fspath(game)
        json_path = os.path.splitext(path)[0] + ".json"
        for needed in (path, json_path):
            if not os.path.isfile(needed):
                raise FileNotFoundError(
                    f"TextWorld game file {needed!r} not found; generate games with `{MAKE_GAMES_HINT}` "
                    f"(`--quick` makes one small game) and pass the .z8 path as game=..."
                )
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.game_path = path
        self.max_steps = max_steps
        self.goal_categories: list[str] = list(GOAL_CATEGORIES)
        self._with_policy = False  # policy_commands requested (only once the expert was used)
        self._gym = self._make_gym()
        # Static game data, from the Game object the env hands out (no second load of the .json).
        with _quiet():
            _, info = self._gym.reset()
        tw_game = info["game"]
        self.objective: str = str(tw_game.objective)
        self.max_score = float(tw_game.max_score)
        self.walkthrough: list[str] = list(tw_game.walkthrough or [])
        entities = [(str(e.type), str(e.name)) for e in tw_game.infos.values() if e.name]
        self.rooms = sorted({name for kind, name in entities if kind == "r"})
        # The map, for the expert's route to a "go to" goal: room -> {direction: room} and {direction: door}.
        names = {key: str(e.name or key) for key, e in tw_game.infos.items()}  # the player "P", inventory "I"
        self._exits: dict[str, dict[str, str]] = {}
        self._doors: dict[str, dict[str, str]] = {}
        for room in tw_game.world.rooms:
            here = names.get(room.name, room.name)
            self._exits[here] = {d: names.get(r.name, r.name) for d, r in room.exits.items()}
            self._doors[here] = {d: names.get(x.name, x.name) for d, x in room.doors.items() if x is not None}
        # Where each thing starts (room, and the container holding it, if any), for the expert's route to a take
        # or open goal; things the player moves are not tracked (that would need the slow facts).
        where: dict[str, tuple[str, str]] = {}  # thing -> (relation, holder)
        for fact in tw_game.world.facts:
            if fact.name in ("at", "in", "on") and len(fact.arguments) == 2:
                thing, holder = (names.get(a.name, a.name) for a in fact.arguments)
                where[thing] = (fact.name, holder)
        kinds = {str(e.name): str(e.type) for e in tw_game.infos.values() if e.name}
        self._home: dict[str, tuple[str, str | None]] = {}
        for thing in where:
            holder, container, hops = thing, None, 0
            while holder in where and where[holder][0] != "at" and hops < 8:
                holder, hops = where[holder][1], hops + 1
                if container is None and kinds.get(holder) == "c":
                    container = holder
            if holder in where and kinds.get(where[holder][1]) == "r":
                self._home[thing] = (where[holder][1], container)
        self.rule_goals: dict[str, list[str]] = {
            # A room without exits (a one-room game) can never be newly entered.
            "go_to": [f"go to the {name}" for name in self.rooms if self._exits.get(name)],
            "take": sorted({f"take the {name}" for kind, name in entities if kind in _PORTABLE_TYPES}),
            "open": sorted({f"open the {name}" for kind, name in entities if kind in _OPENABLE_TYPES}),
        }
        # Only the categories this game has goals of (evaluation resets with every listed category).
        self.goal_categories = ["objective", *(c for c in GOAL_CATEGORIES if self.rule_goals.get(c))]
        self._goal = self.objective
        self._obs = ""
        self._admissible: list[str] = []
        self._policy: list[str] | None = None
        self._actions: list[str] = []
        self._score = 0.0
        self._room = ""
        self._t = 0
        self._started = False

    def _make_gym(self) -> Any:
        """The stack ``textworld.gym`` builds (``textworld.start`` + the ``Filter`` wrapper, same 4-tuple ``step``
        and cumulative score), kept loaded: ``TextworldGymEnv.reset`` reloads the game file on every reset
        (10-16 ms against 3-4 ms here)."""
        import textworld
        from textworld import EnvInfos
        from textworld.envs.wrappers import Filter

        infos = EnvInfos(admissible_commands=True, won=True, lost=True, game=True, policy_commands=self._with_policy)
        return Filter(textworld.start(self.game_path, request_infos=infos))

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Restart the game. Options: ``goal`` (the objective or one of ``rule_goals``), ``goal_category``."""
        super().reset(seed=seed)
        options = options or {}
        goal: str | None = options.get("goal")
        category: str | None = options.get("goal_category")
        if goal is not None:
            known = {self.objective, *(g for goals in self.rule_goals.values() for g in goals)}
            if goal not in known:
                examples = [g for goals in self.rule_goals.values() for g in goals[:2]]
                raise ValueError(
                    f"unknown goal {goal!r} for {self.game_path}; goals are the objective "
                    f"({self.objective[:60]!r}...) or rule goals such as {examples}"
                )
        elif category is not None:
            if category not in GOAL_CATEGORIES:
                raise ValueError(f"unknown goal_category {category!r}; known: {list(GOAL_CATEGORIES)}")
            if category == "objective":
                goal = self.objective
            else:
                choices = self.rule_goals[category]
                if not choices:
                    raise ValueError(f"{self.game_path} has no goal of category {category!r}")
                goal = choices[int(self.np_random.integers(len(choices)))]
        self._goal = goal if goal is not None else self.objective
        with _quiet():
            raw, info = self._gym.reset()
        self._obs = clean_text(raw)
        headings = _HEADING.findall(self._obs)
        self._room = headings[-1].lower() if headings else ""
        self._actions, self._score, self._t, self._started = [], 0.0, 0, True
        self._update(info, terminated=False)
        return self._obs, self._info([], invalid=False, info=info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Run a command; see the class docstring for rewards, termination and achieved goals."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        self._t += 1
        if not self._check_action(action, self._admissible):
            truncated = self._t >= self.max_steps
            info = {"won": False, "lost": False}
            return self._obs, 0.0, False, truncated, self._info([], invalid=True, info=info)
        with _quiet():
            raw, score, done, info = self._gym.step(action)
        self._actions.append(action)
        self._obs = clean_text(raw)
        achieved: list[str] = []
        command_goal = _command_goal(action)
        if command_goal is not None:
            achieved.append(command_goal)
        headings = _HEADING.findall(self._obs)
        if headings and headings[-1].lower() != self._room:
            self._room = headings[-1].lower()
            achieved.append(f"go to the {self._room}")
        if info["won"]:
            achieved.append(self.objective)
        score_gain = float(score) - self._score
        self._score = float(score)
        if self._goal == self.objective:
            reward, terminated = score_gain, bool(done)
        else:
            reward = 1.0 if self._goal in achieved else 0.0
            terminated = bool(done) or reward > 0
        truncated = not terminated and self._t >= self.max_steps
        self._update(info, terminated=terminated)
        return self._obs, reward, terminated, truncated, self._info(achieved, invalid=False, info=info)

    def close(self) -> None:
        self._gym.close()

    # ------------------------------------------------------------------------------------------ contract API
    def goal_space(self, category: str, split: str) -> list[str]:
        """The game's goals of ``category``: ``[objective]`` for ``objective``, else ``rule_goals[category]`` (one
        game, no held-out split: ``split`` is ignored). Unknown category -> ValueError."""
        if category == "objective":
            return [self.objective]
        if category not in self.rule_goals:
            raise ValueError(f"unknown TextWorld goal category {category!r}; known: objective, "
                             f"{list(self.rule_goals)}")
        return list(self.rule_goals[category])

    def goal_category(self, goal: str) -> str:
        """``go_to``/``take``/``open`` from a rule goal's first words, else ``objective``. Pure."""
        return "objective" if goal == self.objective else goal_category(goal)

    def goal_step_limit(self, goal: str) -> int | None:
        """``max_steps`` for every goal (one fixed limit). Pure."""
        return self.max_steps

    def expert_action(self) -> str:
        """The next command of the game's winning policy from the current state (``policy_commands``).

        The first call rebuilds the game with ``policy_commands`` requested and replays this episode's commands
        (quest tracking cannot be switched on mid-episode); the env then keeps requesting it. The policy wins
        the *objective*. For a rule goal: the goal's own command when it is admissible now (``take the coin`` ->
        ``take coin``); for ``go to the <room>`` the next move of a shortest route on the game's map (opening or
        unlocking a door on the way when that is admissible); for ``take``/``open``: ``drop``/``close`` first
        when held or open already, else the route to the room where the thing started and ``open`` its container
        there; otherwise the objective's next command, which need not reach the goal (e.g. an item the player
        moved, or a locked container).

        Raises:
            RuntimeError: no winning policy from this state (the game is over).
        """
        if not self._started:
            raise RuntimeError("call reset() before expert_action()")
        if self._goal != self.objective:
            for command in self._admissible:
                if _command_goal(command) == self._goal:
                    return command
            if self._goal.startswith("go to the "):
                move = self._route_command(self._goal.removeprefix("go to the "))
                if move is not None:
                    return move
            else:
                move = self._fetch_command(self._goal.removeprefix("take the ").removeprefix("open the "))
                if move is not None:
                    return move
        if not self._with_policy:
            self._with_policy = True
            self._gym.close()
            self._gym = self._make_gym()
            with _quiet():
                _, info = self._gym.reset()
                for command in self._actions:
                    _, _, _, info = self._gym.step(command)
            self._policy = list(info["policy_commands"])
        if not self._policy:
            raise RuntimeError(f"no winning policy from this state of {self.game_path} (the game is over)")
        return self._policy[0]

    # ------------------------------------------------------------------------------------------------ helpers
    def _fetch_command(self, thing: str) -> str | None:
        """Toward a take/open goal on ``thing``: undo it when held/open already, else go to the room where it
        started and open its container there."""
        for verb in ("drop ", "close "):  # held already / open already: undo it first, so it can newly happen
            if verb + thing in self._admissible:
                return verb + thing
        if thing not in self._home:
            return None
        room, container = self._home[thing]
        if room != self._room:
            return self._route_command(room)
        if container is not None and f"open {container}" in self._admissible:
            return f"open {container}"
        return None

    def _route_command(self, target: str) -> str | None:
        """The admissible command starting a shortest route from the current room to ``target`` (None if none).

        Already in ``target``: step out by any exit (arriving is what counts), the route then leads back.
        """
        if target == self._room:
            return next((c for c in self._admissible if c.startswith("go ")), None)
        parent: dict[str, tuple[str, str]] = {}  # room -> (previous room, direction taken from it)
        frontier, seen = [self._room], {self._room}
        while frontier and target not in seen:
            nxt = []
            for room in frontier:
                for direction, other in self._exits.get(room, {}).items():
                    if other not in seen:
                        seen.add(other)
                        parent[other] = (room, direction)
                        nxt.append(other)
            frontier = nxt
        if target not in parent:
            return None
        room = target
        while parent[room][0] != self._room:
            room = parent[room][0]
        direction = parent[room][1]
        if f"go {direction}" in self._admissible:
            return f"go {direction}"
        door = self._doors.get(self._room, {}).get(direction)
        if door is not None:
            for command in self._admissible:
                if command == f"open {door}" or command.startswith(f"unlock {door} with "):
                    return command
        return None

    def _update(self, info: dict[str, Any], *, terminated: bool) -> None:
        admissible = list(info["admissible_commands"] or [])
        if not terminated:
            admissible = self._require_actions(admissible, f"TextWorld game {self.game_path} at step {self._t}")
        self._admissible = admissible
        self._policy = list(info["policy_commands"]) if self._with_policy else None

    def _info(self, achieved: list[str], *, invalid: bool, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "goal": self._goal,
            "goal_category": self.goal_category(self._goal),
            "admissible_actions": list(self._admissible),
            "achieved_goals": achieved,
            "invalid_action": invalid,
            "score": self._score,
            "max_score": self.max_score,
            "won": bool(info["won"]),
            "lost": bool(info["lost"]),
        }
