"""Glue between text and tensors: text steps -> buffer transitions, and token-level acting -> an ``ActFn``.

The collector speaks text (``TextStep``), the buffer speaks token ids (``TransitionBatch``) and the agent speaks
padded tensors. Both directions go through the same ``PromptCodec`` so that the prompt the policy acts on is exactly
the prompt the buffer re-assembles at training time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from sacglam.prompting import PromptCodec
from sacglam.types import ActFn, ActOutput, TextStep, TransitionBatch


class GoalRegistry(Protocol):
    """What the encoder needs of the buffer: a goal table that stores each distinct goal's tokens once."""

    def register_goal(self, tokens: list[int], limit: int = 0) -> int: ...


class TokenActor(Protocol):
    """What the act function needs of the agent."""

    def act(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        cand_ids: torch.Tensor,
        cand_mask: torch.Tensor,
        *,
        greedy: bool,
        generator: torch.Generator | None,
    ) -> ActOutput: ...


class StepEncoder:
    """Tokenises one ``TextStep`` of N envs into a ``TransitionBatch`` and keeps the goal string -> id mapping.

    Args:
        codec: the prompt codec (tokenises goals, observations and candidates).
        goals: the buffer's goal table.
        goal_limit: step limit of a goal string (the env's ``goal_step_limit``; None when unknown).
        max_achieved: width G of the achieved-goal ids (the buffer's ``max_achieved``).
        use_achieved: store the env's ``achieved_goals`` (the ``oracle`` source); False stores none, for an
            achieved-goal source that fills them in once the episode ends (``ReplayBuffer.set_achieved``).
    """

    def __init__(
        self,
        codec: PromptCodec,
        goals: GoalRegistry,
        goal_limit: Callable[[str], int | None],
        max_achieved: int,
        use_achieved: bool = True,
    ) -> None:
        self.codec = codec
        self.use_achieved = use_achieved
        self.goals = goals
        self.goal_limit = goal_limit
        self.max_achieved = max_achieved
        self.goal_ids: dict[str, int] = {}

    def goal_id(self, goal: str) -> int:
        """Id of ``goal`` in the buffer's goal table, registering it (tokens and step limit) on first sight."""
        gid = self.goal_ids.get(goal)
        if gid is None:
            gid = self.goals.register_goal(self.codec.goal_tokens(goal), self.goal_limit(goal) or 0)
            self.goal_ids[goal] = gid
        return gid

    def __call__(self, step: TextStep, policy_version: int = 0) -> TransitionBatch:
        """Encode ``step`` (N envs) on the CPU; the buffer moves it to its device.

        Raises:
            ValueError: a step achieved more goals than ``max_achieved`` allows.
        """
        n = len(step.goals)
        obs, obs_len = self.codec.encode_observations(step.observations, step.candidates)
        next_obs, next_obs_len = self.codec.encode_observations(step.next_observations, step.next_candidates)
        cands, cand_len = self.codec.encode_candidates(step.candidates)
        next_cands, next_cand_len = self.codec.encode_candidates(step.next_candidates)
        achieved = torch.full((n, self.max_achieved), -1, dtype=torch.long)
        if self.use_achieved:
            for goals in step.achieved_goals:
                if len(goals) > self.max_achieved:
                    raise ValueError(
                        f"a step achieved {len(goals)} goals ({goals}) but buffer.max_achieved={self.max_achieved}; "
                        f"raise buffer.max_achieved to at least {len(goals)}"
                    )
            achieved, _ = self.goal_rows(step.achieved_goals)
        return TransitionBatch(
            obs=obs,
            obs_len=obs_len,
            next_obs=next_obs,
            next_obs_len=next_obs_len,
            cands=cands,
            cand_len=cand_len,
            next_cands=next_cands,
            next_cand_len=next_cand_len,
            goal=torch.tensor([self.goal_id(g) for g in step.goals], dtype=torch.long),
            action=torch.tensor(step.actions, dtype=torch.long),
            reward=torch.tensor(step.rewards, dtype=torch.float32),
            terminated=torch.tensor(step.terminated, dtype=torch.bool),
            truncated=torch.tensor(step.truncated, dtype=torch.bool),
            achieved=achieved,
            logp=torch.tensor(step.logp, dtype=torch.float32),
            policy_version=torch.full((n,), policy_version, dtype=torch.long),
        )

    def goal_rows(self, achieved: Sequence[Sequence[str]]) -> tuple[torch.Tensor, int]:
        """Per-step goal strings -> ids [L, max_achieved] long (-1 padded), registering new goals; goals beyond
        ``max_achieved`` at a step are left out and counted (the second value)."""
        ids = torch.full((len(achieved), self.max_achieved), -1, dtype=torch.long)
        over = 0
        for t, goals in enumerate(achieved):
            over += max(0, len(goals) - self.max_achieved)
            for j, g in enumerate(goals[: self.max_achieved]):
                ids[t, j] = self.goal_id(g)
        return ids, over

    def state_dict(self) -> dict[str, Any]:
        return {"goal_ids": dict(self.goal_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.goal_ids = dict(state["goal_ids"])


def make_act_fn(
    agent: TokenActor,
    codec: PromptCodec,
    *,
    greedy: bool,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> ActFn:
    """An ``ActFn`` over text: encode prompts and candidates with ``codec``, act with ``agent`` on ``device``.

    Returns actions [N] and behaviour log-probs [N] on the CPU (the collector indexes Python lists with them).
    """

    def act(goals: Sequence[str], observations: Sequence[str], candidates: Sequence[Sequence[str]]) -> ActOutput:
        prompt_ids, prompt_mask = codec.encode_prompts(goals, observations, candidates)
        cand_ids, cand_mask = codec.candidate_tensors(candidates)
        out = agent.act(
            prompt_ids.to(device),
            prompt_mask.to(device),
            cand_ids.to(device),
            cand_mask.to(device),
            greedy=greedy,
            generator=generator,
        )
        return ActOutput(action=out.action.cpu(), logp=out.logp.float().cpu())

    return act


def check_context(codec: PromptCodec, max_positions: int | None) -> None:
    """Fail early when the widest prompt plus candidate the codec can produce exceeds the model's context.

    Candidates continue from the prompt (positions restart at the prompt's end for each), so the furthest position
    is ``prompt_width + max_cand_tokens``. ``max_positions`` None (e.g. T5's relative positions) skips the check.
    """
    need = codec.prompt_width + codec.max_cand_tokens
    if max_positions is not None and need > max_positions:
        raise ValueError(
            f"prompts need up to {need} positions (template + buffer.max_goal_tokens={codec.max_goal_tokens} + "
            f"buffer.max_obs_tokens={codec.max_obs_tokens} + buffer.max_cand_tokens={codec.max_cand_tokens}) but the "
            f"model accepts {max_positions}; lower buffer.max_obs_tokens (longer observations are then cut as "
            "prompt.obs_truncation says, and counted in charts/obs_truncated)"
        )


def tokenizer_corpus(template: str, env: Any, episodes: int, seed: int) -> list[str]:
    """Text for a tokenizer built from scratch: the prompt template's own words plus ``env_corpus``."""
    return [template.replace("{goal}", " ").replace("{obs}", " "), *env_corpus(env, episodes, seed)]


def listed_goals(env: Any) -> list[str]:
    """Every goal ``env.goal_space(category, split)`` lists, per goal category and for both splits (``train`` then
    ``test``); none where the env lists none."""
    goal_space = getattr(env, "goal_space", None)
    if not callable(goal_space):
        return []
    goals: list[str] = []
    for category in getattr(env, "goal_categories", []):
        for split in ("train", "test"):
            try:
                goals += goal_space(category, split)
            except (ValueError, KeyError):  # a category without a list (e.g. TextWorld's objective), a split too
                continue
    return goals


def reset_to_category(env: Any, seed: int, category: str | None) -> tuple[str, dict[str, Any]]:
    """``env.reset`` with a goal of ``category`` (None: the env's choice), or of the env's choice where it has no
    goal of that category (e.g. a TextWorld game without a door to open)."""
    try:
        return env.reset(seed=seed, options={"goal_category": category} if category is not None else None)
    except ValueError:
        return env.reset(seed=seed)


def env_corpus(env: Any, episodes: int, seed: int) -> list[str]:
    """Text an env produces (goals, observations, actions) over ``episodes`` random episodes, for a tokenizer.

    Goals come from every category (``reset(options={"goal_category": c})``) and, where the env lists them,
    from ``goal_space(category, split)`` for both splits so that held-out names are in the vocabulary too.
    """
    rng = torch.Generator().manual_seed(seed)
    texts = listed_goals(env)
    categories = list(getattr(env, "goal_categories", [])) or [None]
    for ep in range(episodes):
        obs, info = reset_to_category(env, seed + ep, categories[ep % len(categories)])
        texts += [info["goal"], obs, *info["admissible_actions"]]
        for _ in range(64):
            actions = info["admissible_actions"]
            action = actions[int(torch.randint(len(actions), (1,), generator=rng))]
            obs, _, terminated, truncated, info = env.step(action)
            texts += [obs, *info["admissible_actions"], *info.get("achieved_goals", [])]
            if terminated or truncated:
                break
    return texts
