"""BitFlip-Text: the hindsight-relabelling sanity check (Andrychowicz et al. 2017, section 3.1), in text.

``n`` bits shown as ``Bits: 0 1 1 0``; the goal is ``Make the bits 1 0 1 1``; the actions are ``Flip bit i`` with
**1-based** ``i`` counted from the left (``Flip bit 1`` flips the first bit shown). An episode starts from a state
different from its goal and lasts at most ``n`` steps (enough for the expert, which needs at most ``n`` flips).
Every step reaches a new state, so ``info["achieved_goals"]`` is ``["Make the bits <state reached>"]``; the reward is
1 and the episode terminates iff that is the goal. One goal category, ``bitflip``.

``bit_words="indexed"`` writes each bit as one word naming its position and value, ``Bits: 1off 2on 3on 4off`` and
``Make the bits 1on 2off 3on 4on``: the same task, but a small transformer trained from scratch need not count word
positions to tell which ``Flip bit i`` fixes a difference. ``scripts/bitflip_supervised_probe.py`` (hidden 64 x 2
layers, 2,000 supervised steps): greedy accuracy 0.53 with digits, 0.75-0.79 with indexed words (uniform 0.51).

``actions="set"`` (with indexed words) names each action by the word it writes: in state ``Bits: 1off 2on`` the
actions are ``Set 1on`` and ``Set 2off`` (still one per bit, each flipping it; the list changes with the state). The
dynamics, goals and rewards are unchanged, but a correct move is now one whose word appears in the goal, so the
policy's decision is a copy from the goal text instead of a per-bit comparison. With it the same probe reaches 1.00
in 100 steps; it is the form the tiny-model ``experiment=bitflip_her`` uses (docs/results.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.base import TextEnvBase

GOAL_PREFIX = "Make the bits "
OBS_PREFIX = "Bits: "
CATEGORY = "bitflip"
BIT_WORDS = ("digits", "indexed")
ACTION_FORMS = ("flip", "set")


class BitFlipTextEnv(TextEnvBase):
    """BitFlip in text.

    Args:
        n_bits: number of bits (>= 1); also the step limit.
        invalid_action: ``raise`` (InvalidActionError) or ``noop`` (a wasted step flagged in ``info``).
        render_mode: None or ``ansi``.
        bit_words: ``digits`` (``0 1 1 0``, the docs/design/ENVIRONMENTS.md form) or ``indexed`` (``1off 2on 3on
        4off``).
        actions: ``flip`` (``Flip bit i``, the docs/design/ENVIRONMENTS.md form) or ``set`` (``Set 3on``: the word the
        action
            writes; needs ``bit_words="indexed"``).
    """

    def __init__(self, n_bits: int = 8, invalid_action: str = "raise", render_mode: str | None = None,
                 bit_words: str = "digits", actions: str = "flip") -> None:
        super().__init__(invalid_action=invalid_action)
        if n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits}")
        if bit_words not in BIT_WORDS:
            raise ValueError(f"bit_words must be one of {BIT_WORDS}, got {bit_words!r}")
        if actions not in ACTION_FORMS:
            raise ValueError(f"actions must be one of {ACTION_FORMS}, got {actions!r}")
        if actions == "set" and bit_words != "indexed":
            raise ValueError(f"actions='set' names each action by a bit's word, so it needs bit_words='indexed' "
                             f"(got bit_words={bit_words!r})")
        self.bit_words = bit_words
        self.action_form = actions
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.n_bits = int(n_bits)
        self.render_mode = render_mode
        self.goal_categories: list[str] = [CATEGORY]
        # "flip": the candidate list never changes, built once and copied into each info. "set": both words of each
        # bit are actions (only the one that changes the bit is admissible at a time).
        self._actions: list[str] = [f"Flip bit {i}" for i in range(1, self.n_bits + 1)]
        if actions == "set":
            self._actions = [f"Set {w}" for i in range(self.n_bits) for w in self._words(i)]
        per_bit = 1 if actions == "flip" else 2
        self._action_index: dict[str, int] = {a: i // per_bit for i, a in enumerate(self._actions)}
        self._bits = np.zeros(self.n_bits, dtype=np.int8)
        self._goal_bits = np.zeros(self.n_bits, dtype=np.int8)
        self._goal = ""
        self._obs = ""
        self._t = 0
        self._done = True

    # -- goals --------------------------------------------------------------------------------------------------

    def _words(self, i: int) -> tuple[str, str]:
        """The words of bit ``i`` (0-based) for value 0 and value 1."""
        return ("0", "1") if self.bit_words == "digits" else (f"{i + 1}off", f"{i + 1}on")

    def bits_text(self, bits: np.ndarray) -> str:
        """The words of ``bits`` [n_bits] as the observation and goal texts write them."""
        return " ".join(self._words(i)[int(b)] for i, b in enumerate(bits.tolist()))

    def parse_goal(self, goal: str) -> np.ndarray:
        """The bits [n_bits] int8 that ``goal`` asks for; ValueError naming the goal when it is not one."""
        body = goal[len(GOAL_PREFIX) :].split(" ") if goal.startswith(GOAL_PREFIX) else []
        if len(body) != self.n_bits or any(b not in self._words(i) for i, b in enumerate(body)):
            example = GOAL_PREFIX + self.bits_text(np.arange(self.n_bits) % 2 == 0)
            raise ValueError(f"unknown BitFlip-Text goal {goal!r} for n_bits={self.n_bits}, bit_words="
                             f"{self.bit_words!r}; e.g. {example!r}")
        return np.array([b == self._words(i)[1] for i, b in enumerate(body)], dtype=np.int8)

    def goal_category(self, goal: str) -> str:
        """Always ``bitflip`` for a valid goal; pure. Unknown goal -> ValueError."""
        self.parse_goal(goal)
        return CATEGORY

    def goal_space(self, category: str, split: str) -> list[str]:
        """All ``2 ** n_bits`` goals (one category, no held-out split: ``split`` is ignored), in binary order.

        Raises:
            ValueError: an unknown category, or ``n_bits > 16`` (65,536 goals is as far as a list is sensible).
        """
        if category != CATEGORY:
            raise ValueError(f"BitFlip-Text has one goal category, {CATEGORY!r}; got {category!r}")
        if self.n_bits > 16:
            raise ValueError(f"goal_space lists 2 ** n_bits goals; n_bits={self.n_bits} is too many (> 16)")
        n = self.n_bits
        return [GOAL_PREFIX + self.bits_text(np.array([(v >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.int8))
                for v in range(2**n)]

    def goal_step_limit(self, goal: str) -> int:
        """``n_bits`` (the expert needs at most that many flips); pure. Unknown goal -> ValueError."""
        self.parse_goal(goal)
        return self.n_bits

    # -- gymnasium API ------------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode from a random state different from the goal.

        Args:
            seed: seeds ``self.np_random`` (state and goal are drawn from it).
            options: ``{"goal": "Make the bits ..."}`` sets the goal; ``{"goal_category": "bitflip"}`` is accepted.

        Returns:
            The observation text and the info dict (``goal``, ``goal_category``, ``admissible_actions``,
            ``achieved_goals`` = [], ``invalid_action`` = False).
        """
        super().reset(seed=seed)
        options = options or {}
        unknown_keys = set(options) - {"goal", "goal_category"}
        if unknown_keys:
            raise ValueError(f"unknown reset options {sorted(unknown_keys)}; use 'goal' or 'goal_category'")
        category = options.get("goal_category", CATEGORY)
        if category != CATEGORY:
            raise ValueError(f"unknown goal category {category!r}; BitFlip-Text has only {CATEGORY!r}")
        goal = options.get("goal")
        if goal is not None:
            self._goal_bits = self.parse_goal(goal)
        else:
            self._goal_bits = self.np_random.integers(0, 2, self.n_bits, dtype=np.int8)
        self._goal = GOAL_PREFIX + self.bits_text(self._goal_bits)
        # The start must differ from the goal: redraw (uniform over the other 2^n - 1 states; 2 draws at worst
        # on average, for n = 1).
        self._bits = self.np_random.integers(0, 2, self.n_bits, dtype=np.int8)
        while np.array_equal(self._bits, self._goal_bits):
            self._bits = self.np_random.integers(0, 2, self.n_bits, dtype=np.int8)
        self._obs = OBS_PREFIX + self.bits_text(self._bits)
        self._t = 0
        self._done = False
        return self._obs, self._info([], False)

    def actions_text(self, bits: np.ndarray) -> list[str]:
        """The actions in state ``bits`` [n_bits], one per bit in bit order: ``Flip bit i``, or ``Set <word>`` with
        the word each bit would get."""
        if self.action_form == "flip":
            return list(self._actions)
        return [f"Set {self._words(i)[1 - int(b)]}" for i, b in enumerate(bits.tolist())]

    def admissible_actions(self) -> list[str]:
        """The actions of the current state (:meth:`actions_text` of it)."""
        return self.actions_text(self._bits)

    def _info(self, achieved: list[str], invalid: bool) -> dict[str, Any]:
        return {
            "goal": self._goal,
            "goal_category": CATEGORY,
            "admissible_actions": self.admissible_actions(),
            "achieved_goals": achieved,
            "invalid_action": invalid,
        }

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Flip one bit.

        Returns:
            ``(observation, reward, terminated, truncated, info)``: reward 1.0 and terminated iff the bits now equal
            the goal; truncated after ``n_bits`` steps otherwise.
        """
        if self._done:
            raise RuntimeError("BitFlipTextEnv.step called before reset() or after the episode ended; call reset()")
        valid = self._check_action(action, self.admissible_actions())
        achieved: list[str] = []
        if valid:
            self._bits[self._action_index[action]] ^= 1
            state = self.bits_text(self._bits)
            self._obs = OBS_PREFIX + state
            achieved = [GOAL_PREFIX + state]
        self._t += 1
        reward = self.compute_reward(achieved, self._goal)
        terminated = reward > 0
        truncated = not terminated and self._t >= self.n_bits
        self._done = terminated or truncated
        return self._obs, reward, terminated, truncated, self._info(achieved, not valid)

    def expert_action(self) -> str:
        """Flip the first (leftmost) bit that differs from the goal (any action if none differs)."""
        diff = np.flatnonzero(self._bits != self._goal_bits)
        return self.admissible_actions()[int(diff[0]) if diff.size else 0]

    def render(self) -> str | None:
        """The current observation text (``render_mode="ansi"``), else None."""
        return self._obs if self.render_mode == "ansi" else None

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode (invalid no-op steps included)."""
        return self._t
