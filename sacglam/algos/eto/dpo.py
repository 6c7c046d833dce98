"""ETO (Exploration-based Trajectory Optimisation, Song et al. 2024) on candidate-action envs: the reusable pieces.

docs/design/ALGORITHM.md section 7. A round of ETO: (1) the current policy explores every training task once; (2) per
task id
the explored trajectory is paired with the expert's (or the best one seen), the lower-reward one rejected, ties
dropped, the rejected one cut at the chosen one's length plus ``margin`` turns (:func:`make_pairs`); (3) DPO with the
sigmoid loss (:func:`dpo_loss`), the reference being the checkpoint the round starts from. The trajectory
log-likelihood is ``sum_t log pi(a_t | s_t)`` under the candidate-set policy (:func:`trajectory_logp`), the very
policy the SAC actor and ``Agent.act`` use. Pairs can be stored in ETO's conversation layout (:func:`write_pairs`,
:func:`read_pairs`).

The training loop (``python train.py algo=eto``) is ``sacglam.algos.eto.trainer``; tasks are played by
``sacglam.algos.eto.rollout``.

Shape letters: P trajectories (or pairs), N flattened steps, K candidate slots.

The options (:class:`ETOConfig`) live in the light ``sacglam.algos.eto.config`` (the Hydra schema imports them
without torch) and are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sacglam.algos.eto.config import ETOConfig
from sacglam.episodes import EpisodeRecord
from sacglam.losses import candidate_policy
from sacglam.prompting import PromptCodec

# ---------------------------------------------------------------------------------------------------------------------
# pairing


def task_id(ep: EpisodeRecord) -> str:
    """The task an episode attempted: its goal and first observation (``goal + "\\n" + o_0``).

    Two runs of one training task (same goal, same reset) share it; pass another ``key`` to :func:`make_pairs` when
    an env's tasks are named otherwise (e.g. by reset seed).
    """
    return f"{ep.goal}\n{ep.observations[0]}"


def episode_reward(ep: EpisodeRecord) -> float:
    """The trajectory's reward: the sum of its step rewards."""
    return float(sum(ep.rewards))


def truncate_episode(ep: EpisodeRecord, steps: int) -> EpisodeRecord:
    """The episode's first ``steps`` steps (itself when it is not longer); a cut one is marked truncated.

    Raises:
        ValueError: ``steps`` < 1.
    """
    if steps < 1:
        raise ValueError(f"truncate_episode: steps must be >= 1, got {steps}")
    if ep.length <= steps:
        return ep
    return replace(
        ep, observations=ep.observations[: steps + 1], candidates=ep.candidates[:steps], actions=ep.actions[:steps],
        rewards=ep.rewards[:steps], achieved=ep.achieved[:steps], policy_version=ep.policy_version[:steps],
        terminated=False, truncated=True, success=False,
    )


@dataclass
class Pair:
    """One preference pair of trajectories on the same task.

    Attributes:
        id: unique id of the pair (the explored episode's id by default).
        task: the task id both trajectories attempted.
        chosen: the preferred trajectory (higher reward).
        rejected: the other one, cut to at most ``chosen.length + margin`` steps.
    """

    id: str
    task: str
    chosen: EpisodeRecord
    rejected: EpisodeRecord


@dataclass
class PairStats:
    """What :func:`make_pairs` did with the explored episodes.

    Attributes:
        pairs: pairs made.
        ties: explored reward equal to the reference's: dropped.
        swapped: explored reward higher: the explored one is chosen, the reference rejected.
        missing: no reference for the task: skipped.
        truncated: rejected trajectories cut at the chosen length plus the margin.
    """

    pairs: int = 0
    ties: int = 0
    swapped: int = 0
    missing: int = 0
    truncated: int = 0


def make_pairs(
    explored: Sequence[EpisodeRecord],
    reference: Mapping[str, EpisodeRecord],
    margin: int,
    *,
    key: Callable[[EpisodeRecord], str] = task_id,
) -> tuple[list[Pair], PairStats]:
    """Pair each explored trajectory with its task's reference (the expert's, or the best seen).

    Rules (ETO): explored reward strictly lower -> ``Pair(chosen=reference, rejected=explored)``; strictly higher ->
    roles swapped; equal -> dropped; no reference for the task -> skipped. The rejected trajectory is cut to at most
    ``chosen.length + margin`` steps.

    Args:
        explored: the episodes the policy played this round.
        reference: task id -> reference trajectory (ids as ``key`` gives them).
        margin: extra turns the rejected trajectory may have beyond the chosen one's length (>= 0).
        key: the task id of an episode (default :func:`task_id`).

    Returns:
        the pairs in ``explored`` order (id: the explored episode's id), and :class:`PairStats`.
    """
    if margin < 0:
        raise ValueError(f"make_pairs: margin must be >= 0, got {margin}")
    pairs: list[Pair] = []
    stats = PairStats()
    for ep in explored:
        task = key(ep)
        ref = reference.get(task)
        if ref is None:
            stats.missing += 1
            continue
        r_exp, r_ref = episode_reward(ep), episode_reward(ref)
        if r_exp == r_ref:
            stats.ties += 1
            continue
        chosen, rejected = (ref, ep) if r_exp < r_ref else (ep, ref)
        stats.swapped += int(r_exp > r_ref)
        cut = truncate_episode(rejected, chosen.length + margin)
        stats.truncated += int(cut is not rejected)
        pairs.append(Pair(id=ep.id, task=task, chosen=chosen, rejected=cut))
    stats.pairs = len(pairs)
    return pairs, stats


def best_trajectories(
    episodes: Iterable[EpisodeRecord], *, key: Callable[[EpisodeRecord], str] = task_id
) -> dict[str, EpisodeRecord]:
    """Per task, the highest-reward trajectory seen (``pair_with="best"``); ties go to the shortest, then the first.

    Args:
        episodes: trajectories of any number of tasks (e.g. the expert's and every round's explored ones).
        key: the task id of an episode (default :func:`task_id`).
    """
    best: dict[str, EpisodeRecord] = {}
    for ep in episodes:
        task = key(ep)
        cur = best.get(task)
        if cur is None or (episode_reward(ep), -ep.length) > (episode_reward(cur), -cur.length):
            best[task] = ep
    return best


# ---------------------------------------------------------------------------------------------------------------------
# DPO


class DPOOutput(NamedTuple):
    """The DPO loss of P pairs.

    Attributes:
        loss: 0-d, ``mean(-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))))`` (with gradient).
        reward_margin: 0-d, mean of ``chosen_reward - rejected_reward`` (detached).
        accuracy: 0-d, fraction of pairs whose margin is > 0 (detached).
        chosen_reward: [P] implicit rewards ``beta * (pi_c - ref_c)`` (detached).
        rejected_reward: [P] ``beta * (pi_r - ref_r)`` (detached).
    """

    loss: torch.Tensor
    reward_margin: torch.Tensor
    accuracy: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """The sigmoid DPO loss (Rafailov et al. 2023) on trajectory log-likelihoods, as ETO trains it.

    Args:
        pi_chosen, pi_rejected: [P] ``log pi(trajectory)`` under the policy being trained (with gradient).
        ref_chosen, ref_rejected: [P] the same under the frozen reference (gradient, if any, is ignored).
        beta: > 0, the KL weight.

    Returns:
        :class:`DPOOutput`.

    Raises:
        ValueError: ``beta`` not positive, no pair, or the four tensors are not all of one shape [P].
    """
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    shapes = {n: tuple(t.shape) for n, t in (("pi_chosen", pi_chosen), ("pi_rejected", pi_rejected),
                                             ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected))}
    if len(set(shapes.values())) != 1 or pi_chosen.dim() != 1 or pi_chosen.numel() == 0:
        raise ValueError(f"dpo_loss: expects four non-empty [P] tensors of one shape, got {shapes}")
    chosen = beta * (pi_chosen - ref_chosen.detach())
    rejected = beta * (pi_rejected - ref_rejected.detach())
    logits = chosen - rejected
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        margin = logits.detach()
        return DPOOutput(loss=loss, reward_margin=margin.mean(), accuracy=(margin > 0).to(margin.dtype).mean(),
                         chosen_reward=chosen.detach(), rejected_reward=rejected.detach())


def sft_loss(pi_chosen: torch.Tensor, chosen_steps: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the chosen trajectories per step: ``-sum(pi_chosen) / sum(chosen_steps)``.

    Every action counts once, whatever trajectory it is in (the token-mean of an SFT loss, with actions as tokens).

    Args:
        pi_chosen: [P] ``log pi(trajectory)`` (with gradient).
        chosen_steps: [P] the trajectories' lengths (> 0).
    """
    if pi_chosen.shape != chosen_steps.shape or pi_chosen.dim() != 1:
        raise ValueError(f"sft_loss: pi_chosen {tuple(pi_chosen.shape)} and chosen_steps "
                         f"{tuple(chosen_steps.shape)} must both be [P]")
    total = chosen_steps.sum()
    if not bool(total > 0):
        raise ValueError("sft_loss: the chosen trajectories have no step")
    return -pi_chosen.sum() / total.to(pi_chosen.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# trajectory log-likelihood under the candidate-set policy


def _step_log_pi(
    agent: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
) -> torch.Tensor:
    """[B, K] log pi of the online actor of ``agent``, as ``Agent.act`` computes it (no critic pass)."""
    from sacglam.agent import Agent
    from sacglam.algos.ppo.learner import PPOAgent

    if isinstance(agent, Agent):
        out = agent._score(agent.actor_adapter, prompt_ids, prompt_mask, cand_ids, cand_mask)
        log_pi, _ = candidate_policy(out.logp, out.valid, agent.cfg.temperature)
        return log_pi
    if isinstance(agent, PPOAgent):
        return agent(prompt_ids, prompt_mask, cand_ids, cand_mask).log_pi
    raise TypeError(f"trajectory_logp: agent must be a sacglam Agent or PPOAgent, got {type(agent).__name__}")


def trajectory_logp(
    agent: nn.Module,
    codec: PromptCodec,
    episodes: Sequence[EpisodeRecord],
    device: torch.device | str,
    *,
    max_steps_per_batch: int = 64,
) -> torch.Tensor:
    """``sum_t log pi(a_t | s_t)`` of each episode under the agent's candidate-set policy.

    ``pi`` is the softmax over the state's candidates of their scores divided by the temperature, computed by the
    agent's own scorer and ``losses.candidate_policy`` (what ``Agent.act`` samples from). The steps of all episodes
    are flattened and scored in chunks of ``max_steps_per_batch`` states, then summed per episode. The result is
    differentiable: every chunk's graph is kept until the caller's backward (memory grows with the steps given).
    The module's train/eval mode is respected (call ``agent.eval()`` for dropout-free values).

    Args:
        agent: a :class:`sacglam.agent.Agent` (its online actor) or a :class:`sacglam.algos.ppo.learner.PPOAgent`.
        codec: the prompt codec the agent acts with.
        episodes: P episodes; ``episodes[i].candidates[t]`` and ``actions[t]`` give state t's candidates and action.
        device: where the model is.
        max_steps_per_batch: states per forward pass (>= 1).

    Returns:
        [P] float on ``device`` (0.0 for an episode with no step).
    """
    if max_steps_per_batch < 1:
        raise ValueError(f"trajectory_logp: max_steps_per_batch must be >= 1, got {max_steps_per_batch}")
    goals: list[str] = []
    observations: list[str] = []
    candidates: list[list[str]] = []
    actions: list[int] = []
    owner: list[int] = []
    for i, ep in enumerate(episodes):
        for t in range(ep.length):
            goals.append(ep.goal)
            observations.append(ep.observations[t])
            candidates.append(ep.candidates[t])
            actions.append(ep.actions[t])
            owner.append(i)
    chunks: list[torch.Tensor] = []
    for lo in range(0, len(actions), max_steps_per_batch):
        hi = lo + max_steps_per_batch
        prompt_ids, prompt_mask = codec.encode_prompts(goals[lo:hi], observations[lo:hi], candidates[lo:hi])
        cand_ids, cand_mask = codec.candidate_tensors(candidates[lo:hi])
        log_pi = _step_log_pi(agent, prompt_ids.to(device), prompt_mask.to(device), cand_ids.to(device),
                              cand_mask.to(device))
        action = torch.tensor(actions[lo:hi], dtype=torch.long, device=log_pi.device)
        chunks.append(log_pi.gather(-1, action.unsqueeze(-1)).squeeze(-1).float())
    out = torch.zeros(len(episodes), dtype=torch.float32, device=device)
    if not chunks:
        return out
    index = torch.tensor(owner, dtype=torch.long, device=device)
    return out.index_add(0, index, torch.cat(chunks).to(device))


def pair_logps(
    agent: nn.Module, codec: PromptCodec, pairs: Sequence[Pair], device: torch.device | str, *,
    max_steps_per_batch: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(chosen), log pi(rejected))``, each [P], from one flattened pass over both sides' steps."""
    logp = trajectory_logp(agent, codec, [p.chosen for p in pairs] + [p.rejected for p in pairs], device,
                           max_steps_per_batch=max_steps_per_batch)
    return logp[: len(pairs)], logp[len(pairs) :]


def reference_logps(
    agent: nn.Module, codec: PromptCodec, pairs: Sequence[Pair], device: torch.device | str, *,
    max_steps_per_batch: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference side of DPO: :func:`pair_logps` without gradient and without dropout.

    ETO's reference is the checkpoint the round starts from, so calling this once on a round's pairs before its
    first update gives every reference value of the round without keeping a copy of the model.
    """
    was_training = agent.training
    agent.eval()
    try:
        with torch.no_grad():
            return pair_logps(agent, codec, pairs, device, max_steps_per_batch=max_steps_per_batch)
    finally:
        agent.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# pairs file: ETO's conversation layout


def episode_turns(ep: EpisodeRecord) -> list[dict[str, Any]]:
    """ETO's turns of an episode: ``human`` o_0, ``gpt`` a_0, ..., ``gpt`` a_{L-1}, ``human`` o_L.

    A ``gpt`` turn also carries the state's ``candidates`` (the candidate policy needs them) and the step's
    ``reward``.
    """
    turns: list[dict[str, Any]] = []
    for t in range(ep.length):
        turns.append({"from": "human", "value": ep.observations[t]})
        turns.append({"from": "gpt", "value": ep.action_text(t), "candidates": list(ep.candidates[t]),
                      "reward": float(ep.rewards[t])})
    turns.append({"from": "human", "value": ep.observations[ep.length]})
    return turns


_META = ("id", "env_index", "goal_category", "terminated", "truncated", "success", "env_step")


def pair_to_json(pair: Pair) -> dict[str, Any]:
    """One line of the pairs file: ``{id, prompt, chosen, rejected}`` plus ``task`` and each side's episode fields
    that the turns do not hold (``chosen_meta``, ``rejected_meta``)."""
    return {
        "id": pair.id, "prompt": pair.chosen.goal, "chosen": episode_turns(pair.chosen),
        "rejected": episode_turns(pair.rejected), "task": pair.task,
        "chosen_meta": {k: getattr(pair.chosen, k) for k in _META},
        "rejected_meta": {k: getattr(pair.rejected, k) for k in _META},
    }


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> int:
    """Write pairs as JSONL in ETO's layout (see :func:`pair_to_json`); returns the number written.

    The two trajectories of a pair must share the goal (the record's one ``prompt``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for pair in pairs:
            if pair.chosen.goal != pair.rejected.goal:
                raise ValueError(f"write_pairs: pair {pair.id} has chosen goal {pair.chosen.goal!r} but rejected "
                                 f"goal {pair.rejected.goal!r}; a record has one prompt")
            f.write(json.dumps(pair_to_json(pair), ensure_ascii=False) + "\n")
            n += 1
    return n


class _LineError(ValueError):
    """A malformed record; ``read_pairs`` adds the file and line number."""


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise _LineError(f"missing field {where}{name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _LineError(f"field {where}{name!r} has the wrong type {type(value).__name__}")
    return value


def _turns_to_episode(turns: Any, side: str, goal: str, meta: Any) -> EpisodeRecord:
    if not isinstance(turns, list):
        raise _LineError(f"field {side!r} must be a list of turns, got {type(turns).__name__}")
    if len(turns) < 3 or len(turns) % 2 == 0:
        raise _LineError(f"field {side!r} has {len(turns)} turns; expected human, gpt, human, ... ending with the "
                         "final observation's human turn (an odd count >= 3)")
    observations: list[str] = []
    candidates: list[list[str]] = []
    actions: list[int] = []
    rewards: list[float] = []
    for j, turn in enumerate(turns):
        where = f"{side}[{j}]."
        if not isinstance(turn, dict):
            raise _LineError(f"{side}[{j}] must be an object, got {type(turn).__name__}")
        speaker = _field(turn, "from", str, where)
        value = _field(turn, "value", str, where)
        expected = "human" if j % 2 == 0 else "gpt"
        if speaker != expected:
            raise _LineError(f"field {where}'from' is {speaker!r} but turns must alternate human/gpt starting with "
                             f"human: expected {expected!r}")
        if speaker == "human":
            observations.append(value)
            continue
        cands = _field(turn, "candidates", list, where)
        if not cands or not all(isinstance(c, str) for c in cands):
            raise _LineError(f"field {where}'candidates' must be a non-empty list of strings")
        if value not in cands:
            raise _LineError(f"field {where}'value' (action {value!r}) is not among its candidates {cands}")
        reward = turn.get("reward", 0.0)
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise _LineError(f"field {where}'reward' must be a number, got {reward!r}")
        candidates.append(list(cands))
        actions.append(cands.index(value))
        rewards.append(float(reward))
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _LineError(f"field '{side}_meta' must be an object, got {type(meta).__name__}")
    L = len(actions)
    try:
        env_index, env_step = int(meta.get("env_index", -1)), int(meta.get("env_step", 0))
    except (TypeError, ValueError):
        raise _LineError(f"field '{side}_meta' has a non-integer env_index or env_step") from None
    return EpisodeRecord(
        id=str(meta.get("id", side)), env_index=env_index, goal=goal,
        goal_category=str(meta.get("goal_category", "")), observations=observations, candidates=candidates,
        actions=actions, rewards=rewards, achieved=[[] for _ in range(L)], policy_version=[0] * L,
        terminated=bool(meta.get("terminated", False)), truncated=bool(meta.get("truncated", False)),
        success=bool(meta.get("success", False)), env_step=env_step,
    )


def pair_from_json(record: Any) -> Pair:
    """A :class:`Pair` from one parsed line of the pairs file.

    Raises:
        ValueError: the record is malformed (names the field).
    """
    if not isinstance(record, dict):
        raise _LineError(f"a record must be a JSON object, got {type(record).__name__}")
    pair_id = _field(record, "id", (str, int), "")
    goal = _field(record, "prompt", str, "")
    chosen = _turns_to_episode(_field(record, "chosen", list, ""), "chosen", goal, record.get("chosen_meta"))
    rejected = _turns_to_episode(_field(record, "rejected", list, ""), "rejected", goal, record.get("rejected_meta"))
    task = record.get("task")
    return Pair(id=str(pair_id), task=task if isinstance(task, str) else task_id(chosen), chosen=chosen,
                rejected=rejected)


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a pairs file written by :func:`write_pairs` (or by hand, in ETO's layout with ``candidates``).

    Blank lines are skipped. ``task`` defaults to :func:`task_id` of the chosen trajectory, rewards to 0, and the
    episode fields the turns do not hold to neutral values.

    Raises:
        ValueError: a line is malformed: ``"<file>:<line>: <what>"`` with the 1-based line number and the field
            (bad JSON, a missing field, a gpt turn without ``candidates``, an action not among its candidates, turns
            not alternating).
    """
    path = Path(path)
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: bad JSON ({err.msg} at column {err.colno})") from None
            try:
                pairs.append(pair_from_json(record))
            except _LineError as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
    return pairs


__all__ = [
    "DPOOutput",
    "ETOConfig",
    "Pair",
    "PairStats",
    "best_trajectories",
    "dpo_loss",
    "episode_reward",
    "episode_turns",
    "make_pairs",
    "pair_from_json",
    "pair_logps",
    "pair_to_json",
    "read_pairs",
    "reference_logps",
    "sft_loss",
    "task_id",
    "trajectory_logp",
    "truncate_episode",
    "write_pairs",
]
