"""Hindsight-relabelled trajectories from a run's episode log, as JSONL datasets TRL's trainers take as they are.

    python scripts/export_hindsight.py RUN --format messages                  # -> RUN/hindsight-messages-oracle.jsonl
    python scripts/export_hindsight.py RUN --format sft --source rule --out sft.jsonl
    python scripts/export_hindsight.py RUN --format dpo --source llm relabel.llm.device=cuda --max-episodes 5000

The run must have logged its episodes (``train.py logger.episodes=true``: ``RUN/episodes/episodes-*.jsonl.gz``, read
with ``sacglam.episode_log.read_episodes``, resume rule included; a data-parallel run's other ranks' files, in
``RUN/episodes/rank<k>/``, are read with them, in env-step order). Every FAILED episode is relabelled with the goals
it achieved, by the chosen source:

- ``oracle``: the env's own achieved goals, as logged (``EpisodeRecord.achieved``); confidence 1.
- ``rule`` / ``llm``: ``sacglam.relabel.make_source`` with the run's ``relabel`` config (``source`` replaced) and
  ``env.rules``, over an env built from the run's config (``RUN/.hydra/config.yaml`` plus hydra-style overrides,
  as ``sacglam/run/tools.py`` rebuilds runs); confidence is the source's (the llm judge's P(Yes)).

For each goal g' a failed episode achieved, at the FIRST step t* that achieved it, the trajectory is cut after step
t* (steps 0..t*, the achieving action last) and written under goal g'; a goal achieved again later adds nothing (the
later cut only adds a detour). ``--include-successes`` also writes each successful episode under its own goal, cut
at its last step (``source: "success"``, confidence 1).

Formats (TRL's conversational dataset types; ``datasets.load_dataset("json", data_files=OUT)`` loads them):

- ``messages`` (conversational language modeling), one record per (episode, hindsight goal)::

      {"messages": [{"role": "system", ...} (when prompt.system is set),
                    {"role": "user", "content": "Goal: g'\\nObservation: o_0"}, {"role": "assistant", "content": a_0},
                    {"role": "user", "content": o_1}, ..., {"role": "assistant", "content": a_t*}], ...}

- ``sft`` (conversational prompt-completion), one record per step t <= t*: ``prompt`` = the messages up to and
  including the user turn with o_t, ``completion`` = ``[{"role": "assistant", "content": a_t}]``. Observations are
  never in a completion.
- ``dpo`` (conversational preference), one record per step t <= t*: ``prompt`` as in sft, ``chosen`` = the action
  taken, ``rejected`` = another admissible candidate of step t, drawn with ``random.Random(f"{episode_id}/{t}")``
  (deterministic across runs and machines). Steps with a single distinct candidate are skipped and counted.

  This per-step pairing (same prompt: the taken action vs an alternative) is ours. AgentHER pairs one trajectory
  under the hindsight goal against the same trajectory under the original goal, and ETO pairs two trajectories under
  one goal; neither fits TRL's shared-prompt preference layout for envs that act by choosing among candidate actions
  (their "prompts" differ or their completions are whole multi-turn trajectories).

The first user turn follows the run's ``prompt.template`` without the text after ``{obs}`` (the assistant turn takes
its place): ``"Goal: {goal}\\nObservation: {obs}\\nAction:"`` gives ``"Goal: g'\\nObservation: o_0"``; later user
turns are the observation alone. With ``prompt.list_actions`` every observation is followed by its candidates in
``prompt.actions_format``. Every record also holds ``source``, ``confidence``, ``episode_id``, ``goal`` (the hindsight
goal), ``original_goal``, ``achieved_step`` (t*) and, for sft and dpo, ``step`` (t).

A summary (episodes read, failed, relabelled, records written, skipped log lines) goes to stdout, progress to stderr.
A missing folder or a run without an episode log ends with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import envs  # noqa: F401 - registers the sacglam/ env ids the run config names (sacglam never imports envs)
from sacglam.config import PromptConfig, TrainConfig
from sacglam.episode_log import LogReport, read_episodes, resolve_log
from sacglam.episodes import EpisodeRecord
from sacglam.prompting import PromptTemplate
from sacglam.relabel import SOURCES, AchievedGoalSource, OracleSource, Relabelled, make_source
from sacglam.run import builders, tools

FORMATS = ("sft", "dpo", "messages")
SUCCESS_SOURCE = "success"
BATCH = 64  # episodes handed to the source at once
PROGRESS_S = 5.0

Message = dict[str, str]


# ---------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Hindsight:
    """A goal ``goal`` an episode achieved first at step ``step``, by ``source`` with ``confidence``."""

    step: int
    goal: str
    source: str
    confidence: float


def hindsight_goals(ep: EpisodeRecord, res: Relabelled, source: str) -> list[Hindsight]:
    """Each goal of ``res`` once, at the first step that achieved it, in step order."""
    out: dict[str, Hindsight] = {}
    for t, (goals, confs) in enumerate(zip(res.achieved, res.confidence, strict=True)):
        for g, c in zip(goals, confs, strict=True):
            if g not in out:
                out[g] = Hindsight(t, g, source, float(c))
    return list(out.values())


class TurnWriter:
    """Turns an episode into chat messages under a goal, following the run's prompt config."""

    def __init__(self, prompt: PromptConfig) -> None:
        self.template = PromptTemplate.from_format(prompt.template)
        self.system = prompt.system
        self.actions_format = prompt.actions_format if prompt.list_actions else None
        if self.actions_format is not None and self.actions_format.count("{actions}") != 1:
            raise ValueError(f"prompt.actions_format must hold '{{actions}}' exactly once, got "
                             f"{self.actions_format!r}")

    def observation(self, ep: EpisodeRecord, t: int) -> str:
        """o_t as the user turn shows it (with its candidates listed when ``prompt.list_actions`` is on)."""
        obs = ep.observations[t]
        if self.actions_format is None:
            return obs
        return obs + self.actions_format.replace("{actions}", ", ".join(ep.candidates[t]))

    def messages(self, ep: EpisodeRecord, goal: str, t_end: int) -> list[Message]:
        """System (if any), then user o_0 (with the goal), assistant a_0, ..., user o_t_end, assistant a_t_end."""
        msgs: list[Message] = [{"role": "system", "content": self.system}] if self.system is not None else []
        for t in range(t_end + 1):
            obs = self.observation(ep, t)
            text = f"{self.template.pre}{goal}{self.template.mid}{obs}" if t == 0 else obs
            msgs.append({"role": "user", "content": text})
            msgs.append({"role": "assistant", "content": ep.action_text(t)})
        return msgs


@dataclass
class Counts:
    """What an export did (the summary's numbers)."""

    episodes: int = 0
    failed: int = 0
    succeeded: int = 0
    relabelled: int = 0  # failed episodes with at least one hindsight goal
    hindsight_goals: int = 0
    records: int = 0
    dpo_single_candidate: int = 0  # dpo steps skipped: no other candidate
    source: dict[str, int] = field(default_factory=lambda: {"proposed": 0, "accepted": 0, "rejected": 0,
                                                            "dropped": 0})


def rejected_action(ep: EpisodeRecord, t: int) -> str | None:
    """A candidate of step t other than the action taken (None when there is none), drawn deterministically from the
    episode id and the step."""
    taken = ep.action_text(t)
    others = [c for c in ep.candidates[t] if c != taken]
    if not others:
        return None
    return random.Random(f"{ep.id}/{t}").choice(others)


def episode_records(ep: EpisodeRecord, h: Hindsight, fmt: str, turns: TurnWriter,
                    counts: Counts) -> Iterator[dict[str, Any]]:
    """The records of ``ep`` cut after step ``h.step`` under goal ``h.goal``, in format ``fmt``."""
    meta = {"source": h.source, "confidence": float(h.confidence), "episode_id": ep.id, "goal": h.goal,
            "original_goal": ep.goal, "achieved_step": h.step}
    msgs = turns.messages(ep, h.goal, h.step)
    if fmt == "messages":
        yield {"messages": msgs, **meta}
        return
    head = 1 if turns.system is not None else 0
    for t in range(h.step + 1):
        prompt = msgs[: head + 2 * t + 1]  # ... up to and including the user turn with o_t
        answer = [msgs[head + 2 * t + 1]]
        if fmt == "sft":
            yield {"prompt": prompt, "completion": answer, **meta, "step": t}
            continue
        other = rejected_action(ep, t)
        if other is None:
            counts.dpo_single_candidate += 1
            continue
        yield {"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": other}], **meta,
               "step": t}


# ---------------------------------------------------------------------------------------------------------- export


def load_config(run_dir: Path, source: str, overrides: Sequence[str]) -> TrainConfig | None:
    """The run's config with ``overrides``; None when the run has none and ``source`` is oracle (default prompt).

    Raises:
        RunError: no config while the source needs the env (or overrides are given).
    """
    path = run_dir / tools.CONFIG_FILE
    if not path.is_file() and source == "oracle" and not overrides:
        print(f"warning: {path} missing: the default prompt template is used", file=sys.stderr)
        return None
    if not path.is_file():
        raise tools.RunError(f"{path} does not exist: --source {source} and overrides need the run's config "
                             f"(a train.py run keeps it in RUN/{tools.CONFIG_FILE})")
    return tools.config_from_file(path, overrides)


def build_source(cfg: TrainConfig | None, source: str) -> AchievedGoalSource:
    """The achieved-goal source ``source`` as the run would build it (its relabel config, env and env rules)."""
    if source == "oracle":
        return OracleSource()
    assert cfg is not None
    env = builders.make_env_fn(cfg)()
    return make_source(dataclasses.replace(cfg.relabel, source=source), env, cfg.env.rules)


def export(run_dir: Path, fmt: str, source: str, out: Path, *, include_successes: bool = False,
           max_episodes: int | None = None, overrides: Sequence[str] = (),
           progress: bool = True) -> tuple[Counts, LogReport]:
    """Write the hindsight dataset of ``run_dir``'s episode log to ``out`` (atomically); return its counts.

    Raises:
        RunError, FileNotFoundError: no such run folder, no config where one is needed, no episode log.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if not run_dir.is_dir():
        raise tools.RunError(f"{run_dir} is not a folder; pass a train.py run folder (trained with "
                             "logger.episodes=true)")
    resolve_log(run_dir)  # a run without a log fails here, before the env or a model is built
    cfg = load_config(run_dir, source, overrides)
    turns = TurnWriter(cfg.prompt if cfg is not None else PromptConfig())
    relabel = build_source(cfg, source)
    counts, report = Counts(), LogReport()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    last = time.monotonic()

    def flush(batch: list[EpisodeRecord], f: Any) -> None:
        failed = [ep for ep in batch if not ep.success]
        results = relabel(failed) if failed else []
        if len(results) != len(failed):
            raise RuntimeError(f"source {source!r} returned {len(results)} results for {len(failed)} episodes")
        by_id = {id(ep): res for ep, res in zip(failed, results, strict=True)}
        for ep in batch:
            if ep.success:
                if not include_successes:
                    continue
                goals = [Hindsight(ep.length - 1, ep.goal, SUCCESS_SOURCE, 1.0)]
            else:
                res = by_id[id(ep)]
                for k in counts.source:
                    counts.source[k] += getattr(res, k)
                goals = hindsight_goals(ep, res, source)
                counts.relabelled += bool(goals)
                counts.hindsight_goals += len(goals)
            for h in goals:
                for rec in episode_records(ep, h, fmt, turns, counts):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    counts.records += 1

    with tmp.open("w", encoding="utf-8") as f:
        batch: list[EpisodeRecord] = []
        for ep in read_episodes(run_dir, report=report):
            if max_episodes is not None and counts.episodes >= max_episodes:
                break
            counts.episodes += 1
            counts.failed += not ep.success
            counts.succeeded += ep.success
            batch.append(ep)
            if len(batch) >= BATCH:
                flush(batch, f)
                batch = []
            if progress and time.monotonic() - last > PROGRESS_S:
                last = time.monotonic()
                print(f"... {counts.episodes} episodes read, {counts.records} records written", file=sys.stderr)
        flush(batch, f)
    os.replace(tmp, out)
    return counts, report


def summary(counts: Counts, report: LogReport, fmt: str, source: str, out: Path) -> str:
    """The lines printed after an export."""
    c = counts
    lines = [
        f"episodes read: {c.episodes} ({c.failed} failed, {c.succeeded} successful) from {len(report.files)} "
        f"file(s); {report.superseded} superseded by a resume",
        f"relabelled ({source}): {c.relabelled} of {c.failed} failed episodes, {c.hindsight_goals} hindsight goals "
        f"(proposed {c.source['proposed']}, accepted {c.source['accepted']}, rejected {c.source['rejected']}, "
        f"dropped {c.source['dropped']})",
        f"records written: {c.records} ({fmt}) -> {out}",
    ]
    if fmt == "dpo":
        lines.append(f"dpo steps skipped (a single candidate): {c.dpo_single_candidate}")
    lines.append(f"episode-log lines skipped: {len(report.errors)}"
                 + (f" (first: {report.errors[0]})" if report.errors else ""))
    if report.unfinished:
        lines.append(f"unfinished log file(s) (run still writing, or killed between writes; nothing lost): "
                     f"{', '.join(p.name for p in report.unfinished)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a train.py run folder trained with logger.episodes=true")
    p.add_argument("overrides", nargs="*", help="hydra-style overrides of the run's config (relabel.llm.device=cuda)")
    p.add_argument("--format", required=True, choices=FORMATS, help="sft | dpo | messages (see above)")
    p.add_argument("--source", default="oracle", choices=SOURCES, help="where hindsight goals come from")
    p.add_argument("--out", type=Path, help="the JSONL file to write (default RUN/hindsight-FORMAT-SOURCE.jsonl)")
    p.add_argument("--include-successes", action="store_true", help="also write successful episodes (own goal)")
    p.add_argument("--max-episodes", type=int, help="read at most this many episodes of the log")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    opts = p.parse_intermixed_args(argv)
    if opts.max_episodes is not None and opts.max_episodes < 0:
        p.error("--max-episodes must be >= 0")

    def run() -> int:
        out = opts.out or opts.run_dir / f"hindsight-{opts.format}-{opts.source}.jsonl"
        counts, report = export(opts.run_dir, opts.format, opts.source, out,
                                include_successes=opts.include_successes, max_episodes=opts.max_episodes,
                                overrides=opts.overrides, progress=not opts.quiet)
        print(summary(counts, report, opts.format, opts.source, out))
        return 0

    return tools.run_main(run, "export_hindsight.py")


if __name__ == "__main__":
    sys.exit(main())
