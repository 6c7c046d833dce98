"""A suite of TextWorld games as one env: a game drawn per episode, with a fixed train / held-out split of games.

    env = TextWorldSuiteEnv(games="games/suite/tw-coin_collector-l5-s*.z8", split="train", heldout=2)
    obs, info = env.reset(seed=0)           # a training game, drawn from the env's random stream
    info["game"]                            # its path; the goal is that game's objective
    heldout = TextWorldSuiteEnv(games="games/suite/tw-coin_collector-l5-s*.z8", split="heldout", heldout=2)

The split is a pure function of the sorted game paths and ``heldout`` (the last ``heldout`` games of the sorted list
are held out; a fraction in (0, 1) holds out that share, rounded, at least one), so a run's training envs and its
evaluation envs agree on it without sharing anything, and the two splits never share a game. Games made with
different ``tw-make`` seeds of one kind (``scripts/make_textworld_games.py --seeds 1 2 ...``) differ in map, room
names and objects, so held-out games test what carries over, not what was memorised.

Each game is a :class:`envs.textworld_env.TextWorldEnv` (loaded once, kept open). Goals, rewards and achieved goals
are the game's: the objective (the default goal) or a rule goal (``take the coin``). ``goal_space(category, split)``
lists the goals of the training games for ``split="train"`` and of the held-out games for any other split, which is
what the tokenizer corpus and the rule/LLM relabel sources read.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

from envs.base import TextEnvBase
from envs.textworld_env import GOAL_CATEGORIES, MAKE_GAMES_HINT, TextWorldEnv, goal_category

SPLITS: tuple[str, ...] = ("train", "heldout", "all")


def resolve_games(games: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Game paths from a glob pattern, a folder (its ``*.z8`` files) or a list of paths/patterns, sorted, unique.

    Raises:
        FileNotFoundError: nothing matches (names the pattern and the script that makes games).
    """
    items = [games] if isinstance(games, (str, os.PathLike)) else list(games)
    paths: list[str] = []
    for item in items:
        text = os.fspath(item)
        if os.path.isdir(text):
            paths += glob.glob(os.path.join(text, "*.z8"))
        elif glob.has_magic(text):
            paths += glob.glob(text)
        else:
            paths.append(text)
    found = sorted(set(paths))
    if not found:
        raise FileNotFoundError(f"no TextWorld game matches {items}; make a suite with `{MAKE_GAMES_HINT} --seeds "
                                f"1 2 3 4 5 6 7 8 --only tw-coin_collector-l5 --out games/suite`")
    return found


def split_games(paths: Sequence[str], heldout: float) -> tuple[list[str], list[str]]:
    """(train, held-out) games: the last ``heldout`` of the sorted paths are held out. Pure.

    Args:
        paths: game paths (sorted here, so the order they come in does not matter).
        heldout: a count (an integer >= 0) or a fraction in (0, 1) of the games (rounded, at least one).

    Raises:
        ValueError: a negative or non-integral count above 1, or a split that leaves no training game.
    """
    ordered = sorted(paths)
    if 0 < heldout < 1:
        n_heldout = max(1, round(heldout * len(ordered)))
    elif heldout >= 0 and float(heldout).is_integer():
        n_heldout = int(heldout)
    else:
        raise ValueError(f"heldout must be a count >= 0 or a fraction in (0, 1), got {heldout}")
    if n_heldout >= len(ordered):
        raise ValueError(f"heldout={heldout} holds out {n_heldout} of {len(ordered)} games and leaves none to train "
                         f"on; make more games or hold out fewer")
    cut = len(ordered) - n_heldout
    return ordered[:cut], ordered[cut:]


class TextWorldSuiteEnv(TextEnvBase):
    """Several TextWorld games, one drawn uniformly per episode from the chosen split.

    ``info`` holds what :class:`TextWorldEnv` gives (score, max_score, won, lost) plus ``game`` (the path played).
    """

    def __init__(
        self,
        games: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        split: str = "train",
        heldout: float = 0,
        max_steps: int = 50,
        invalid_action: str = "raise",
    ) -> None:
        """Open every game of the split.

        Args:
            games: a glob pattern, a folder of ``.z8`` games or a list of paths (see :func:`resolve_games`).
            split: ``train`` (the games not held out), ``heldout`` or ``all``.
            heldout: how many games (or which fraction) to hold out; see :func:`split_games`.
            max_steps: truncation limit per episode.
            invalid_action: as in :class:`TextWorldEnv`.
        """
        super().__init__(invalid_action=invalid_action)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        train, held = split_games(resolve_games(games), heldout)
        if split == "heldout" and not held:
            raise ValueError("split='heldout' with heldout=0: no game is held out; set heldout to a count or fraction")
        self.train_games, self.heldout_games = train, held
        self.split = split
        chosen = {"train": train, "heldout": held, "all": train + held}[split]
        self.games = [TextWorldEnv(p, max_steps=max_steps, invalid_action=invalid_action) for p in chosen]
        # category -> goals, per goal-space split ("train" or "test"), built on the first goal_space call: only the
        # tokenizer corpus and the relabel sources ask, and games of the other split must be opened to answer.
        self._goals_of_split: dict[str, dict[str, list[str]]] = {}
        present = {c for g in self.games for c in g.goal_categories}
        self.goal_categories: list[str] = [c for c in GOAL_CATEGORIES if c in present]
        self.max_steps = max_steps
        self._current: TextWorldEnv | None = None

    def _goal_lists(self, paths: Sequence[str]) -> dict[str, list[str]]:
        """category -> the goals of these games (games of the env's own split reuse their open env)."""
        by_path = {g.game_path: g for g in self.games}
        out: dict[str, list[str]] = {c: [] for c in GOAL_CATEGORIES}
        for p in paths:
            game = by_path.get(p) or TextWorldEnv(p, max_steps=1)
            out["objective"].append(game.objective)
            for c, goals in game.rule_goals.items():
                out[c] += goals
            if p not in by_path:
                game.close()
        return {c: list(dict.fromkeys(goals)) for c, goals in out.items()}

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Draw a game (one that has the requested ``goal`` or ``goal_category``, if given) and reset it."""
        super().reset(seed=seed)
        options = options or {}
        goal: str | None = options.get("goal")
        category: str | None = options.get("goal_category")
        pool = self.games
        if goal is not None:
            pool = [g for g in self.games if goal == g.objective or any(goal in v for v in g.rule_goals.values())]
            if not pool:
                raise ValueError(f"goal {goal!r} is no goal of the {self.split} games of this suite "
                                 f"({len(self.games)} games)")
        elif category is not None:
            if category not in GOAL_CATEGORIES:
                raise ValueError(f"unknown goal_category {category!r}; known: {list(GOAL_CATEGORIES)}")
            pool = [g for g in self.games if category in g.goal_categories]
            if not pool:
                raise ValueError(f"no {self.split} game of this suite has a goal of category {category!r}")
        game = pool[int(self.np_random.integers(len(pool)))]
        self._current = game
        game_seed = int(self.np_random.integers(2**31 - 1))
        obs, info = game.reset(seed=game_seed, options=options or None)
        return obs, {**info, "game": game.game_path}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """One command in the current game (see :class:`TextWorldEnv`)."""
        if self._current is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, terminated, truncated, info = self._current.step(action)
        return obs, reward, terminated, truncated, {**info, "game": self._current.game_path}

    def close(self) -> None:
        for game in self.games:
            game.close()

    # ------------------------------------------------------------------------------------------ contract API
    def goal_space(self, category: str, split: str) -> list[str]:
        """The goals of ``category`` over the training games (``split="train"``) or the held-out ones (else)."""
        key = "train" if split == "train" else "test"
        if key not in self._goals_of_split:
            self._goals_of_split[key] = self._goal_lists(self.train_games if key == "train" else self.heldout_games)
        lists = self._goals_of_split[key]
        if category not in lists:
            raise ValueError(f"unknown TextWorld goal category {category!r}; known: {list(GOAL_CATEGORIES)}")
        return list(lists[category])

    def goal_category(self, goal: str) -> str:
        """``go_to``/``take``/``open`` from a rule goal's first words, else ``objective``. Pure."""
        return goal_category(goal)

    def goal_step_limit(self, goal: str) -> int | None:
        """``max_steps`` for every goal. Pure."""
        return self.max_steps

    def expert_action(self) -> str:
        """The current game's expert action (see :meth:`TextWorldEnv.expert_action`)."""
        if self._current is None:
            raise RuntimeError("call reset() before expert_action()")
        return self._current.expert_action()
