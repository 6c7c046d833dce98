"""Where achieved goals come from (docs/design/ALGORITHM.md section 6): the env's oracle, rules over text, or an LLM
judge.

A *source* maps finished episodes (``sacglam.episodes.EpisodeRecord``) to the goals each step newly achieved::

    source = make_source(cfg.relabel, env, rules)       # env: any env of the run (its goal space)
    results = source(episodes)                          # one Relabelled per episode, in order
    results[0].achieved[t]                              # goals step t achieved, by this source

- ``oracle``: the env's own ``info["achieved_goals"]`` (what the record holds); the training loop then stores them at
  add time, exactly as before this module existed.
- ``rule``: regular expressions over each step's *transition text* (``transition_text``: the observation before, the
  action as ``> action``, the observation after, one per line), each mapping its named groups into a goal template
  (``{obj}``). Every match is an achievement; goals outside the env's goal space are dropped and counted.
- ``llm``: a local Hugging Face model *proposes*, per step, which goal of the env's goal space the step achieved (it
  scores the candidate goals and "nothing" as continuations of the transition: one shared-prefix pass per step, no
  generation), and a *verifier* accepts or rejects each proposal: the rules (``judge=rule``) or a model answering
  "Yes"/"No" (``judge=model``; the same model unless ``judge_model`` names another), accepted when P(Yes) reaches
  ``threshold``. Rejected proposals are counted and never trained on. Unlike AgentHER's code, the judge's verdict is
  the only way in (there is no fallback that accepts a rejected proposal).

The candidate goals of a step come from the env's goal space (``GoalSpace``), ranked by how long a run of the goal's
words appears in the step's text, so proposals always map to goal ids.

Training-loop side (``OnlineRelabeller``): when episodes end, their records go to the source (on the loop's thread,
or on a background thread with ``relabel.llm.background``), and the results come back as goal-id rows for
``ReplayBuffer.set_achieved``. The buffer and HER code see goal ids only; this module never imports them, and the
model code only when the ``llm`` source is built.

The options (:class:`RelabelConfig`, :class:`LLMRelabelConfig`, :class:`RuleConfig`, ``SOURCES``, ``JUDGES``) live in
the light ``sacglam.config`` (the Hydra schema) and are re-exported here.
"""

from __future__ import annotations

import math
import queue
import re
import string
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sacglam.config import JUDGES, SOURCES, LLMRelabelConfig, RelabelConfig, RuleConfig
from sacglam.episodes import EpisodeRecord

# ---------------------------------------------------------------------------------------------------------- results


@dataclass
class Proposal:
    """A claim that step ``step`` of an episode newly achieved ``goal``, with the claimant's confidence."""

    step: int
    goal: str
    confidence: float = 1.0


@dataclass
class Relabelled:
    """What a source says one episode achieved.

    Attributes:
        achieved: L lists, the accepted goals of each step (each goal once per step, in the goal space).
        confidence: L lists aligned with ``achieved``.
        proposed: proposals made (for ``llm``; matches for ``rule``); accepted / rejected: the verifier's verdicts;
        dropped: proposals outside the goal space or the episode's steps, or repeating an earlier proposal of the
            same goal at the same step (never judged).
        ms: milliseconds the source spent on this episode (its share of a batched call).
    """

    achieved: list[list[str]]
    confidence: list[list[float]]
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0
    dropped: int = 0
    ms: float = 0.0


class AchievedGoalSource(Protocol):
    """``(episodes) -> one Relabelled per episode``."""

    name: str

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[Relabelled]: ...


def _line_change(before: str, after: str) -> str:
    """One changed observation line, shortly: for ``label: a, b, c`` lists under the same label, the items removed
    and added (``You see: removed water``); otherwise ``before -> after``."""
    lb, sb, rb = before.partition(": ")
    la, sa, ra = after.partition(": ")
    if sb and sa and ("," in rb or "," in ra or lb == la):
        items_b, items_a = [x.strip() for x in rb.split(",")], [x.strip() for x in ra.split(",")]
        gone = [x for x in items_b if x not in items_a]
        new = [x for x in items_a if x not in items_b]
        if len(gone) + len(new) < max(len(items_b), len(items_a)):  # a list that changed in part
            parts = ([f"removed {', '.join(gone)}"] if gone else []) + ([f"added {', '.join(new)}"] if new else [])
            label = lb if lb == la else f"{lb} -> {la}"
            return f"{label}: {'; '.join(parts)}" if parts else f"{lb} -> {la}"
    return f"{before} -> {after}"


def change_text(ep: EpisodeRecord, t: int) -> str:
    """Step t of ``ep`` as the model roles read it: the action, then the observation lines that changed (a list
    line as the items it lost and gained, ``You see: removed water``; another line as ``before -> after``; lines
    added or removed as ``(none)``); empty when the observation did not change.

    Shorter than the whole transition (a small model reads the change instead of finding it among unchanged text)
    and cheaper to score.
    """
    before, after = ep.observations[t].split("\n"), ep.observations[t + 1].split("\n")
    width = max(len(before), len(after))
    before += ["(none)"] * (width - len(before))
    after += ["(none)"] * (width - len(after))
    changed = [_line_change(b, a) for b, a in zip(before, after, strict=True) if b != a]
    return f"Action: {ep.action_text(t)}\nWhat changed:\n" + "\n".join(changed) if changed else ""


def transition_text(ep: EpisodeRecord, t: int) -> str:
    """Step t of ``ep`` as the rules read it: ``o_t``, ``> a_t``, ``o_{t+1}``, one per line (observations may span
    several lines themselves)."""
    return f"{ep.observations[t]}\n> {ep.action_text(t)}\n{ep.observations[t + 1]}"


# ---------------------------------------------------------------------------------------------------------- goal space

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _best_run(goal: list[str], text: list[str], weight: dict[str, float]) -> float:
    """The heaviest run of consecutive words of ``goal`` found consecutively in ``text`` (a run weighs the sum of its
    words' weights)."""
    best = 0.0
    prev = [0.0] * (len(text) + 1)
    for gw in goal:
        cur = [0.0] * (len(text) + 1)
        w = weight.get(gw, 0.0)
        for j, tw in enumerate(text, 1):
            if gw == tw:
                cur[j] = prev[j - 1] + w
                best = max(best, cur[j])
        prev = cur
    return best


class GoalSpace:
    """The goals an env can achieve, for mapping proposals to known goals and measuring precision per category.

    Args:
        goals: every goal string (order kept: it breaks ranking ties).
        category_of: goal -> its category.
    """

    def __init__(self, goals: Iterable[str], category_of: Callable[[str], str]) -> None:
        self.goals = list(dict.fromkeys(goals))
        self._set = set(self.goals)
        self._category_of = category_of
        self._words = {g: _words(g) for g in self.goals}
        # A word's weight is log(1 + |goals| / goals containing it): object names outweigh verbs shared by half of
        # the goals ("Grasp"), and a word every goal has still counts a little (BitFlip's bits).
        df: dict[str, int] = defaultdict(int)
        for ws in self._words.values():
            for w in set(ws):
                df[w] += 1
        self._weight = {w: math.log1p(len(self.goals) / n) for w, n in df.items()}

    @classmethod
    def from_env(cls, env: Any) -> GoalSpace:
        """Every goal of ``env.goal_space(category, split)`` over the env's categories
        (``env.all_goal_categories`` when it has them, else ``env.goal_categories``) and both splits.

        Raises:
            ValueError: the env lists no goals (it has no ``goal_space``), naming the env.
        """
        space = getattr(env, "goal_space", None)
        if not callable(space):
            raise ValueError(f"{type(env).__name__} has no goal_space(category, split): the rule and llm sources "
                             f"need the env's goals to map achievements to goal ids")
        goals: list[str] = []
        for c in list(getattr(env, "all_goal_categories", None) or env.goal_categories):
            for split in ("train", "test"):
                try:
                    goals += space(c, split)
                except (ValueError, KeyError):
                    continue
        if not goals:
            raise ValueError(f"{type(env).__name__}.goal_space lists no goal")
        return cls(goals, env.goal_category)

    def __contains__(self, goal: object) -> bool:
        return goal in self._set

    def __len__(self) -> int:
        return len(self.goals)

    def category(self, goal: str) -> str:
        """The goal's category ('?' when the env cannot tell)."""
        try:
            return str(self._category_of(goal))
        except (ValueError, KeyError):
            return "?"

    def candidates(self, text: str, k: int) -> list[str]:
        """Up to ``k`` goals ranked by their heaviest run of words found consecutively in ``text`` (words weighted
        by rarity across the goal space), then by the weight of all their words found; goals sharing no word with
        the text, or whose run weighs under half the best one, are left out; remaining ties keep the goal-space
        order."""
        words = _words(text)
        present = set(words)
        scored = []
        for i, g in enumerate(self.goals):
            run = _best_run(self._words[g], words, self._weight)
            if run > 0:
                found = sum(self._weight[w] for w in set(self._words[g]) if w in present)
                scored.append((-run, -found, i, g))
        if not scored:
            return []
        best = -min(scored)[0]
        return [g for run, *_, g in sorted(scored)[:k] if -run >= best / 2]  # not goals that share only a verb


# ---------------------------------------------------------------------------------------------------------- sources


class OracleSource:
    """The env's own achieved goals (the record's ``achieved``)."""

    name = "oracle"

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[Relabelled]:
        out = []
        for ep in episodes:
            n = sum(len(a) for a in ep.achieved)
            out.append(Relabelled([list(a) for a in ep.achieved], [[1.0] * len(a) for a in ep.achieved],
                                  proposed=n, accepted=n))
        return out


class RuleSource:
    """Regular-expression rules over each step's transition text (see ``RuleConfig``).

    Args:
        rules: the rules (``RuleConfig`` or dicts of its fields).
        goal_space: where the produced goals must lie (others are dropped and counted); None keeps every goal.

    Raises:
        ValueError: no rule, an invalid pattern or a template naming a group its pattern lacks (names the rule).
    """

    name = "rule"

    def __init__(self, rules: Sequence[RuleConfig | dict[str, Any]], goal_space: GoalSpace | None = None) -> None:
        self.rules = [r if isinstance(r, RuleConfig) else RuleConfig(**r) for r in rules]
        if not self.rules:
            raise ValueError("relabel.source=rule needs rules: set relabel.rules or env.rules (a list of "
                             "{pattern, goal} with named groups, e.g. {pattern: '^> take (?P<x>.+)$', "
                             "goal: 'take the {x}'})")
        self.goal_space = goal_space
        self._compiled = []
        for i, r in enumerate(self.rules):
            try:
                rx = re.compile(r.pattern, re.MULTILINE)
            except re.error as exc:
                raise ValueError(f"rule {i} ({r.pattern!r}): invalid regular expression: {exc}") from None
            try:  # every field the template formats ("{obj}", "{obj!r}", "{}"; not the literal "{{")
                fields = [f for _, f, _, _ in string.Formatter().parse(r.goal) if f is not None]
            except ValueError as exc:
                raise ValueError(f"rule {i}: goal template {r.goal!r} is not a format string: {exc}") from None
            names = {re.split(r"[.\[]", f, maxsplit=1)[0] for f in fields}
            if not r.goal or names - set(rx.groupindex):
                raise ValueError(f"rule {i}: goal template {r.goal!r} needs groups {sorted(names)} but the pattern "
                                 f"{r.pattern!r} has {sorted(rx.groupindex)}")
            self._compiled.append((rx, r))

    def step_goals(self, text: str) -> list[str]:
        """Goals the rules find in one transition text, each once, in rule order (goal space not applied)."""
        out: list[str] = []
        for rx, r in self._compiled:
            for m in rx.finditer(text):
                groups = {k: (v.lower() if r.lower else v) for k, v in m.groupdict(default="").items()}
                goal = r.goal.format(**groups)
                if goal not in out:
                    out.append(goal)
        return out

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[Relabelled]:
        out = []
        for ep in episodes:
            start = time.perf_counter()
            res = Relabelled([[] for _ in range(ep.length)], [[] for _ in range(ep.length)])
            for t in range(ep.length):
                for g in self.step_goals(transition_text(ep, t)):
                    res.proposed += 1
                    if self.goal_space is not None and g not in self.goal_space:
                        res.dropped += 1
                        continue
                    res.achieved[t].append(g)
                    res.confidence[t].append(1.0)
                    res.accepted += 1
            res.ms = 1000 * (time.perf_counter() - start)
            out.append(res)
        return out


class Proposer(Protocol):
    """Proposes achievements: per episode, a list of ``Proposal`` (goals may lie outside the goal space: the source
    drops and counts them)."""

    def propose(self, episodes: Sequence[EpisodeRecord], goal_space: GoalSpace) -> list[list[Proposal]]: ...


class Judge(Protocol):
    """Verifies proposals: per episode, the confidence in [0, 1] that each proposal is right."""

    def judge(self, episodes: Sequence[EpisodeRecord], proposals: Sequence[Sequence[Proposal]]) -> list[list[float]]:
        ...


class RuleJudge:
    """A verifier from rules: confidence 1 when the rules find the proposed goal at the proposed step, else 0."""

    def __init__(self, rules: RuleSource) -> None:
        self.rules = rules

    def judge(self, episodes: Sequence[EpisodeRecord], proposals: Sequence[Sequence[Proposal]]) -> list[list[float]]:
        out = []
        for ep, props in zip(episodes, proposals, strict=True):
            found: dict[int, list[str]] = {}
            conf = []
            for p in props:
                if p.step not in found:
                    found[p.step] = self.rules.step_goals(transition_text(ep, p.step))
                conf.append(1.0 if p.goal in found[p.step] else 0.0)
            out.append(conf)
        return out


class LLMSource:
    """Proposer + verifier (see the module docstring).

    Args:
        proposer, judge: the two roles (``ModelProposer`` / ``ModelJudge`` / ``RuleJudge``, or scripted ones).
        goal_space: proposals outside it (or outside the episode's steps, or repeating one of the same step) are
            dropped and counted, never judged.
        threshold: a proposal is accepted when its judge confidence is >= this.
    """

    name = "llm"

    def __init__(self, proposer: Proposer, judge: Judge, goal_space: GoalSpace, threshold: float = 0.5) -> None:
        self.proposer, self.judge_, self.goal_space, self.threshold = proposer, judge, goal_space, threshold

    def __call__(self, episodes: Sequence[EpisodeRecord]) -> list[Relabelled]:
        if not episodes:
            return []
        start = time.perf_counter()
        proposals = self.proposer.propose(episodes, self.goal_space)
        results, kept = [], []
        for ep, props in zip(episodes, proposals, strict=True):
            res = Relabelled([[] for _ in range(ep.length)], [[] for _ in range(ep.length)], proposed=len(props))
            ok, seen = [], set()
            for p in props:  # a repeat of (step, goal) is dropped like an unknown goal: judged once, counted once
                if p.goal in self.goal_space and 0 <= p.step < ep.length and (p.step, p.goal) not in seen:
                    seen.add((p.step, p.goal))
                    ok.append(p)
            res.dropped = len(props) - len(ok)
            results.append(res)
            kept.append(ok)
        verdicts = self.judge_.judge(episodes, kept) if any(kept) else [[] for _ in episodes]
        for res, props, conf in zip(results, kept, verdicts, strict=True):
            for p, c in zip(props, conf, strict=True):
                if c >= self.threshold and p.goal not in res.achieved[p.step]:
                    res.achieved[p.step].append(p.goal)
                    res.confidence[p.step].append(float(c))
                    res.accepted += 1
                else:
                    res.rejected += 1
        ms = 1000 * (time.perf_counter() - start) / len(episodes)
        for res in results:
            res.ms = ms
        return results


#--------------------------------------------------------------------------------------------------------- model roles

_PROPOSE_Q = "Which goal did this action just achieve?"
_NOTHING = "Nothing new"


class TextScorer:
    """Log-probabilities of candidate continuations of text prompts under a causal LM (shared-prefix scoring).

    Args:
        model: a ``transformers`` causal LM (eval mode is set); tokenizer: its tokenizer.
        chat: wrap each prompt as a user turn in the tokenizer's chat template (when it has one).
        batch_size: prompts per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, *, chat: bool = True, batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self.device = next(model.parameters()).device

    def _prompt_ids(self, text: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """Per prompt, the summed log-prob of each candidate (its tokens as the tokenizer writes it alone), divided
        by its token count (so longer goal strings are not penalised for their length)."""
        from sacglam.scoring import score_candidates

        sep = "" if self.chat else " "
        out: list[list[float]] = []
        for lo in range(0, len(prompts), self.batch_size):
            ps, cs = prompts[lo : lo + self.batch_size], candidates[lo : lo + self.batch_size]
            p_ids = [self._prompt_ids(p) for p in ps]
            c_ids = [[list(self.tokenizer(sep + c, add_special_tokens=False)["input_ids"]) or [0] for c in cl]
                     for cl in cs]
            B, Lp = len(ps), max(map(len, p_ids))
            K, Lc = max(map(len, c_ids)), max(len(c) for cl in c_ids for c in cl)
            pid = torch.zeros(B, Lp, dtype=torch.long)
            pm = torch.zeros(B, Lp, dtype=torch.bool)
            cid = torch.zeros(B, K, Lc, dtype=torch.long)
            cm = torch.zeros(B, K, Lc, dtype=torch.bool)
            for b, (p, cl) in enumerate(zip(p_ids, c_ids, strict=True)):
                pid[b, : len(p)], pm[b, : len(p)] = torch.tensor(p), True
                for k, c in enumerate(cl):
                    cid[b, k, : len(c)], cm[b, k, : len(c)] = torch.tensor(c), True
            res = score_candidates(self.model, pid.to(self.device), pm.to(self.device), cid.to(self.device),
                                   cm.to(self.device), length_norm=True)
            logp = res.logp.float().cpu()
            out += [logp[b, : len(c_ids[b])].tolist() for b in range(B)]
        return out


def _softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


class ModelProposer:
    """Per step whose observation changed (``change_text``): the goals of the goal space that share the most words
    with the change (up to ``max_goals``) and "Nothing new" scored as answers to "which goal did this action just
    achieve?"; the best answer is proposed when it is a goal, with its probability among the answers. Steps that
    change nothing are not proposed."""

    def __init__(self, scorer: TextScorer, max_goals: int = 16) -> None:
        self.scorer, self.max_goals = scorer, max_goals

    def propose(self, episodes: Sequence[EpisodeRecord], goal_space: GoalSpace) -> list[list[Proposal]]:
        prompts, cands, where = [], [], []
        for e, ep in enumerate(episodes):
            for t in range(ep.length):
                text = change_text(ep, t)
                goals = goal_space.candidates(text, self.max_goals) if text else []
                if not goals:
                    continue
                prompts.append(f"{text}\n{_PROPOSE_Q}")
                cands.append([*goals, _NOTHING])
                where.append((e, t))
        out: list[list[Proposal]] = [[] for _ in episodes]
        for (e, t), cl, lp in zip(where, cands, self.scorer(prompts, cands), strict=True):
            p = _softmax(lp)
            best = max(range(len(cl)), key=p.__getitem__)
            if cl[best] != _NOTHING:
                out[e].append(Proposal(t, cl[best], p[best]))
        return out


class ModelJudge:
    """Per proposal: P(Yes) of "Yes"/"No" answers to whether the step achieved the goal."""

    def __init__(self, scorer: TextScorer) -> None:
        self.scorer = scorer

    def judge(self, episodes: Sequence[EpisodeRecord], proposals: Sequence[Sequence[Proposal]]) -> list[list[float]]:
        prompts, index = [], []
        for e, (ep, props) in enumerate(zip(episodes, proposals, strict=True)):
            for i, p in enumerate(props):
                prompts.append(f'{change_text(ep, p.step)}\nDid this action just achieve the goal "{p.goal}"? '
                               "Answer Yes or No.")
                index.append((e, i))
        out: list[list[float]] = [[0.0] * len(props) for props in proposals]
        scores = self.scorer(prompts, [["Yes", "No"]] * len(prompts)) if prompts else []
        for (e, i), lp in zip(index, scores, strict=True):
            out[e][i] = _softmax(lp)[0]
        return out


def load_scorer(name: str, cfg: LLMRelabelConfig) -> TextScorer:
    """A ``TextScorer`` over the model ``name`` (loaded as ``load_model`` loads ``model.name``, without LoRA)."""
    from sacglam.models import ModelConfig, load_model

    mcfg = ModelConfig(name=name, dtype=cfg.dtype)
    mcfg.lora.enabled = False
    model, tokenizer = load_model(mcfg, device=cfg.device)
    return TextScorer(model, tokenizer, chat=cfg.chat, batch_size=cfg.batch_size)


def make_source(cfg: RelabelConfig, env: Any, env_rules: Sequence[Any] = (),
                goal_space: GoalSpace | None = None) -> AchievedGoalSource:
    """The configured source. ``env`` is any env of the run (its goal space and categories); ``env_rules`` the env's
    rules (``env.rules`` of the config), used when ``cfg.rules`` is unset; ``goal_space``: the env's, when the caller
    has built it already (``GoalSpace.from_env(env)`` otherwise)."""
    if cfg.source == "oracle":
        return OracleSource()
    space = goal_space if goal_space is not None else GoalSpace.from_env(env)
    rules = list(cfg.rules if cfg.rules is not None else env_rules)
    if cfg.source == "rule":
        return RuleSource(rules, space)
    scorer = load_scorer(cfg.llm.model, cfg.llm)
    judge: Judge
    if cfg.llm.judge == "rule":
        judge = RuleJudge(RuleSource(rules, space))
    else:
        judge_scorer = scorer if cfg.llm.judge_model in (None, cfg.llm.model) else load_scorer(
            str(cfg.llm.judge_model), cfg.llm)
        judge = ModelJudge(judge_scorer)
    return LLMSource(ModelProposer(scorer, cfg.llm.max_goals), judge, space, cfg.llm.threshold)


# ---------------------------------------------------------------------------------------------------------- metrics


class RelabelStats:
    """Running counts over a run: the verifier's verdicts, the judge's time, and (where the env has an oracle)
    precision and recall of the accepted (step, goal) pairs against the oracle's, per category of the goal."""

    def __init__(self, goal_space: GoalSpace | None = None) -> None:
        self.goal_space = goal_space
        self.episodes = 0
        self.counts = {"proposed": 0, "accepted": 0, "rejected": 0, "dropped": 0, "stale": 0, "skipped": 0}
        self.ms = 0.0
        self.tp: dict[str, int] = defaultdict(int)
        self.fp: dict[str, int] = defaultdict(int)
        self.fn: dict[str, int] = defaultdict(int)

    def _cat(self, goal: str) -> str:
        return self.goal_space.category(goal) if self.goal_space is not None else "all"

    def add(self, ep: EpisodeRecord, res: Relabelled) -> None:
        """Count one episode's result against its oracle (``ep.achieved``)."""
        self.episodes += 1
        for k in ("proposed", "accepted", "rejected", "dropped"):
            self.counts[k] += getattr(res, k)
        self.ms += res.ms
        said = {(t, g) for t, gs in enumerate(res.achieved) for g in gs}
        truth = {(t, g) for t, gs in enumerate(ep.achieved) for g in gs}
        for t, g in said:
            (self.tp if (t, g) in truth else self.fp)[self._cat(g)] += 1
        for _t, g in truth - said:
            self.fn[self._cat(g)] += 1

    def metrics(self) -> dict[str, float]:
        """``relabel/precision``, ``relabel/recall`` (overall and ``/<category>``, over the episodes judged; a ratio
        with nothing to count is left out), ``relabel/accepted``, ``relabel/rejected``, ``relabel/dropped``,
        ``relabel/stale`` (episodes overwritten or begun before a resume), ``relabel/skipped`` (episodes a busy
        background judge let pass), ``relabel/episodes`` (judged; totals), ``relabel/judge_ms`` (mean per judged
        episode)."""
        if not self.episodes and not self.counts["stale"] and not self.counts["skipped"]:
            return {}
        out: dict[str, float] = {f"relabel/{k}": float(v) for k, v in self.counts.items()}
        out["relabel/episodes"] = float(self.episodes)
        if self.episodes:
            out["relabel/judge_ms"] = self.ms / self.episodes
        cats = sorted(set(self.tp) | set(self.fp) | set(self.fn))
        for suffix, keys in [("", cats), *((f"/{c}", [c]) for c in cats)]:
            tp = sum(self.tp[c] for c in keys)
            said, truth = tp + sum(self.fp[c] for c in keys), tp + sum(self.fn[c] for c in keys)
            if said:
                out[f"relabel/precision{suffix}"] = tp / said
            if truth:
                out[f"relabel/recall{suffix}"] = tp / truth
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "counts": dict(self.counts), "ms": self.ms, "tp": dict(self.tp),
                "fp": dict(self.fp), "fn": dict(self.fn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes, self.ms = int(state["episodes"]), float(state["ms"])
        self.counts = {**dict.fromkeys(self.counts, 0), **state["counts"]}
        for name in ("tp", "fp", "fn"):
            getattr(self, name).clear()
            getattr(self, name).update(state[name])

    @classmethod
    def merged(cls, states: Sequence[dict[str, Any]]) -> RelabelStats:
        """The counts of several ``state_dict()``s summed (the processes of a data-parallel run), so that precision
        and recall are the pooled ones, not a mean of ratios."""
        out = cls()
        for state in states:
            out.episodes += int(state["episodes"])
            out.ms += float(state["ms"])
            for k, v in state["counts"].items():
                out.counts[k] = out.counts.get(k, 0) + int(v)
            for name in ("tp", "fp", "fn"):
                for cat, v in state[name].items():
                    getattr(out, name)[cat] += int(v)
        return out


# ---------------------------------------------------------------------------------------------------------- online


@dataclass
class RelabelJob:
    """A finished episode waiting for its achieved goals: ``env`` and ``start`` locate it in the replay buffer."""

    env: int
    start: int
    episode: EpisodeRecord


class OnlineRelabeller:
    """Runs a source on episodes as they end, batched per vector step, inline or on one background thread.

    ``submit(jobs)`` hands over the episodes that ended at a step; ``collect(wait)`` returns ``(job, Relabelled)``
    pairs that are done (inline: all of them, at once). Results are also counted in ``stats``.

    Args:
        source: the achieved-goal source.
        background: run the source on a daemon thread; ``collect(wait=True)`` (checkpoints, the end of the run)
            waits for everything submitted.
        max_pending: with ``background``, episodes submitted while this many wait are not judged (counted in
            ``stats.counts["skipped"]``): a judge slower than the envs then judges a share of the episodes, the
            latest ones, instead of falling ever further behind. 0: no limit.
    """

    def __init__(self, source: AchievedGoalSource, stats: RelabelStats, *, background: bool = False,
                 max_pending: int = 0) -> None:
        self.source, self.stats, self.background, self.max_pending = source, stats, background, max_pending
        self._done: list[tuple[RelabelJob, Relabelled]] = []
        self._pending = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._queue: queue.Queue[list[RelabelJob] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name="relabel-judge", daemon=True)
            self._thread.start()

    def _run(self, jobs: list[RelabelJob]) -> list[tuple[RelabelJob, Relabelled]]:
        results = self.source([j.episode for j in jobs])
        if len(results) != len(jobs):
            raise RuntimeError(f"achieved-goal source {self.source.name!r} returned {len(results)} results for "
                               f"{len(jobs)} episodes")
        return list(zip(jobs, results, strict=True))

    def _work(self) -> None:
        while True:
            jobs = self._queue.get()
            if jobs is None:
                return
            try:
                done = self._run(jobs)
            except BaseException as exc:  # handed to the loop thread by collect()
                with self._lock:
                    self._error = exc
                    self._pending -= len(jobs)
                continue
            with self._lock:
                self._done += done
                self._pending -= len(jobs)

    def submit(self, jobs: Sequence[RelabelJob]) -> None:
        """Relabel these finished episodes (inline now, or queued for the thread)."""
        if not jobs:
            return
        if self._thread is None:
            self._done += self._run(list(jobs))
            return
        with self._lock:
            if self.max_pending and self._pending >= self.max_pending:
                self.stats.counts["skipped"] += len(jobs)
                return
            self._pending += len(jobs)
        self._queue.put(list(jobs))

    @property
    def pending(self) -> int:
        """Episodes submitted to the thread and not yet done."""
        return self._pending

    def collect(self, wait: bool = False) -> list[tuple[RelabelJob, Relabelled]]:
        """The finished results since the last call (with ``wait``, after everything submitted is done).

        Raises:
            RuntimeError: the source failed on the thread (chained to its exception).
        """
        while wait and self._pending and self._error is None:
            time.sleep(0.002)
        with self._lock:
            done, self._done = self._done, []
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"achieved-goal source {self.source.name!r} failed: {error}") from error
        for job, res in done:
            self.stats.add(job.episode, res)
        return done

    def close(self) -> None:
        """Stop the thread (after the work queued so far)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


__all__ = [
    "JUDGES",
    "SOURCES",
    "AchievedGoalSource",
    "GoalSpace",
    "Judge",
    "LLMRelabelConfig",
    "LLMSource",
    "ModelJudge",
    "ModelProposer",
    "OnlineRelabeller",
    "OracleSource",
    "Proposal",
    "Proposer",
    "RelabelConfig",
    "RelabelJob",
    "RelabelStats",
    "Relabelled",
    "RuleConfig",
    "RuleJudge",
    "RuleSource",
    "TextScorer",
    "change_text",
    "load_scorer",
    "make_source",
    "transition_text",
]
