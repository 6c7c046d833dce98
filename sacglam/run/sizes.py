"""The start-up check of the prompt's token widths against the text the run's envs produce.

The replay buffer and the prompt codec have fixed widths (``buffer.max_goal_tokens``, ``max_cands``,
``max_cand_tokens``, ``max_obs_tokens``). A goal, a state's candidate list or a candidate wider than its limit is an
error, but only when it is first met: a held-out goal at the first evaluation, a state with many commands after
minutes of training. :func:`check_text_sizes` looks before the run starts:

- every goal the env lists (``goal_space(category, split)`` for both splits: exact);
- ``env.preflight_episodes`` episodes on the training env and on every evaluation env (held-out ones included), half
  of them played by the env's expert (which reaches the states deep in a task) and half at random. This part is a
  lower bound: a state no episode reached can still be wider.

Every width that is too small is named in one error, with the value that fits what was seen::

    ValueError: the prompt's token widths are too small for what sacglam/TextWorldSuite-v0 produces (start-up
    check over 8 episodes per env, 412 states, 96 goals): buffer.max_cands=32 < 50 (a state of the heldout
    evaluation env offers 50 actions) ... Set buffer.max_cands=50 ... (or more: start-up play sees only some states).

Observations longer than ``max_obs_tokens`` are cut as ``prompt.obs_truncation`` says, so they are reported, not
refused (unless it is ``error``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sacglam.pipeline import listed_goals, reset_to_category
from sacglam.prompting import PromptCodec

MAX_EPISODE_STEPS = 1000
"""An episode of the check stops here if the env has not ended it (every shipped env has a shorter limit)."""


@dataclass
class TextSizes:
    """The widest pieces seen, in tokens as the prompt holds them (see ``PromptCodec.piece_length``)."""

    goal_tokens: int = 0
    goal: str = ""  # the widest goal
    cands: int = 0  # the most candidate actions of one state
    cands_where: str = ""  # the env of that state, as check_text_sizes names it
    cand_tokens: int = 0
    cand: str = ""  # the widest candidate
    obs_tokens: int = 0
    obs_over: int = 0  # observations wider than max_obs_tokens (cut)
    states: int = 0
    goals: set[str] = field(default_factory=set)

    def add_goal(self, codec: PromptCodec, goal: str) -> None:
        """Count ``goal`` (each distinct goal once)."""
        if goal in self.goals:
            return
        self.goals.add(goal)
        n = codec.piece_length("goal", goal)
        if n > self.goal_tokens:
            self.goal_tokens, self.goal = n, goal

    def add_state(self, codec: PromptCodec, observation: str, candidates: list[str], where: str) -> None:
        """Count one state: its observation (with the listed actions when the prompt lists them) and candidates."""
        self.states += 1
        n_obs = codec.piece_length("obs", codec.observation_text(observation, candidates))
        self.obs_tokens = max(self.obs_tokens, n_obs)
        self.obs_over += n_obs > codec.max_obs_tokens
        if len(candidates) > self.cands:
            self.cands, self.cands_where = len(candidates), where
        for c in candidates:
            n = codec.piece_length("cand", c)
            if n > self.cand_tokens:
                self.cand_tokens, self.cand = n, c


def measure(env: Any, codec: PromptCodec, episodes: int, seed: int, sizes: TextSizes, where: str = "") -> None:
    """Play ``episodes`` episodes of ``env`` into ``sizes``: odd ones by the env's expert (random where it has none
    or gives up), even ones at random, resetting through the goal categories in turn.

    Args:
        env: a text env (``envs.base`` contract).
        codec: the run's prompt codec (its tokenizer counts the tokens).
        episodes: how many episodes.
        seed: reset seeds are ``seed + i``; the random actions are drawn from ``random.Random(seed)``.
        sizes: updated in place.
        where: the env's name in messages (``training``, ``heldout evaluation``...).
    """
    rng = random.Random(seed)
    categories = list(getattr(env, "goal_categories", [])) or [None]
    for ep in range(episodes):
        obs, info = reset_to_category(env, seed + ep, categories[(ep // 2) % len(categories)])
        sizes.add_goal(codec, info["goal"])
        expert = ep % 2 == 1
        for _ in range(MAX_EPISODE_STEPS):
            candidates = list(info["admissible_actions"])
            sizes.add_state(codec, obs, candidates, where)
            action = _expert_action(env) if expert else None
            if action is None or action not in candidates:
                action = rng.choice(candidates)
            obs, _, terminated, truncated, info = env.step(action)
            for goal in info.get("achieved_goals", []):  # hindsight relabels to these: they are goals too
                sizes.add_goal(codec, goal)
            if terminated or truncated:
                break
        sizes.add_state(codec, obs, list(info["admissible_actions"]), where)


def _expert_action(env: Any) -> str | None:
    try:
        return str(env.expert_action())
    except Exception:  # no expert, or none from this state (a bot may fail its own way): play at random instead
        return None


def problems(sizes: TextSizes, codec: PromptCodec) -> dict[str, tuple[int, str]]:
    """``{buffer key: (value needed, why)}`` for each width ``sizes`` exceeds (observations only with
    ``obs_truncation="error"``)."""
    out: dict[str, tuple[int, str]] = {}
    if sizes.goal_tokens > codec.max_goal_tokens:
        out["max_goal_tokens"] = (sizes.goal_tokens, f"goal {_short(sizes.goal)} has {sizes.goal_tokens} tokens")
    if sizes.cands > codec.max_cands:
        out["max_cands"] = (sizes.cands, f"a state of the {sizes.cands_where} env offers {sizes.cands} actions")
    if sizes.cand_tokens > codec.max_cand_tokens:
        out["max_cand_tokens"] = (sizes.cand_tokens, f"action {_short(sizes.cand)} has {sizes.cand_tokens} tokens")
    if codec.obs_truncation == "error" and sizes.obs_tokens > codec.max_obs_tokens:
        out["max_obs_tokens"] = (sizes.obs_tokens, f"an observation has {sizes.obs_tokens} tokens "
                                                   "(prompt.obs_truncation=error)")
    return out


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def summary(sizes: TextSizes, codec: PromptCodec) -> str:
    """One line: each width seen against its limit, how many observations will be cut, and a warning where a seen
    width is within 10% of its limit (the states not reached at start-up may be wider)."""
    line = (f"goals <= {sizes.goal_tokens}/{codec.max_goal_tokens} tokens, <= {sizes.cands}/{codec.max_cands} "
            f"actions per state of <= {sizes.cand_tokens}/{codec.max_cand_tokens} tokens, observations <= "
            f"{sizes.obs_tokens}/{codec.max_obs_tokens} tokens ({sizes.obs_over} of {sizes.states} cut)")
    near = [f"buffer.{k}" for k, seen in (("max_cands", sizes.cands), ("max_cand_tokens", sizes.cand_tokens))
            if seen >= 0.9 * getattr(codec, k)]
    if near:
        line += f"; near the limit, states not reached here may need more: {', '.join(near)}"
    return line


def check_text_sizes(env_id: str, envs: Mapping[str, Any], codec: PromptCodec, episodes: int, seed: int) -> TextSizes:
    """Measure every env of ``envs`` (``{name: env, or a factory of one}``) and refuse widths that are too small.

    Args:
        env_id: the env's id, for the message.
        envs: the envs to play, by the name messages give them (``training``, ``heldout evaluation``...).
        codec: the run's prompt codec; its limits are the ones checked.
        episodes: episodes per env (:func:`measure`).
        seed: the seed of those episodes.

    Returns:
        The sizes seen (for :func:`summary`).

    Raises:
        ValueError: naming every ``buffer.*`` width that is too small, with the value that fits what was seen.
    """
    sizes = TextSizes()
    for name, env in envs.items():
        env = env if hasattr(env, "reset") else env()
        for goal in listed_goals(env):
            sizes.add_goal(codec, goal)
        measure(env, codec, episodes, seed, sizes, where=name)
    found = problems(sizes, codec)
    if found:
        reasons = "; ".join(f"buffer.{k}={getattr(codec, k)} < {n} ({why})" for k, (n, why) in found.items())
        fix = " ".join(f"buffer.{k}={n}" for k, (n, _) in found.items())
        raise ValueError(
            f"the prompt's token widths are too small for what {env_id} produces (start-up check over {episodes} "
            f"episodes per env, {sizes.states} states, {len(sizes.goals)} goals): {reasons}. Set {fix} (or more: "
            "start-up play sees only some states; env.preflight_episodes=0 skips this check)"
        )
    return sizes


__all__ = ["TextSizes", "check_text_sizes", "measure", "problems", "summary"]
