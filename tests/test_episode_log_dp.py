"""The episode log of a data-parallel run: one log per rank (``episodes/`` for rank 0, ``episodes/rank<k>/`` for the
others), read back as one stream.

By hand: two ranks' logs merge by ``env_step`` with ties in rank order, rank 1's ids carry its ``r1`` prefix, the
resume rule applies to each rank's files on their own, and a fresh run moves aside the logs of ranks it does not have.
End to end (``integration``): a 2-process ``torchrun`` run with ``logger.episodes=true`` logs both ranks' episodes,
exactly the episodes the ranks' trackers counted, and ``scripts/export_hindsight.py`` reads them all.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from sacglam.episode_log import EPISODES_DIRNAME, EpisodeLog, LogReport, read_episodes, resolve_log
from sacglam.episodes import EpisodeRecord
from tests.scripts_util import load_script
from tests.test_data_parallel import SMALL, final_state, launch
from tests.test_episode_log import _record


def _rec(k: int, env_step: int) -> EpisodeRecord:
    return _record(k, env_step=env_step)


def _read(path: Path) -> tuple[list[tuple[str, int]], LogReport]:
    """(id, env_step) of every episode read from ``path``, in read order, and the read's report."""
    report = LogReport()
    return [(e.id, e.env_step) for e in read_episodes(path, report=report, on_error="raise")], report


def test_two_ranks_merge_by_env_step_and_rank_one_ids_are_prefixed(tmp_path: Path) -> None:
    r0, r1 = EpisodeLog(tmp_path, rank=0, world=2), EpisodeLog(tmp_path, rank=1, world=2)
    r1.write([_rec(0, 8)])  # rank 1 writes first: the order read does not depend on who wrote first
    r0.write([_rec(1, 8), _rec(2, 8)])
    r0.write([_rec(3, 16)])
    r1.write([_rec(4, 24), _rec(5, 32)])
    r0.write([_rec(6, 24)])
    r0.close()
    r1.close()
    assert r0.path == tmp_path / EPISODES_DIRNAME / "episodes-00000.jsonl.gz"
    assert r1.path == tmp_path / EPISODES_DIRNAME / "rank1" / "episodes-00000.jsonl.gz"
    assert resolve_log(tmp_path) == [r0.path, r1.path]
    got, report = _read(tmp_path)
    # ids: _record(k) is e<k % 2>k<k // 2>; rank 1's carry "r1". Ties of env_step: rank 0 first.
    assert got == [("e1k0", 8), ("e0k1", 8), ("r1e0k0", 8), ("e1k1", 16), ("e0k3", 24), ("r1e0k2", 24),
                   ("r1e1k2", 32)]
    assert report.records == 7 and report.files == [r0.path, r1.path] and not report.errors
    assert _read(tmp_path / EPISODES_DIRNAME)[0] == got, "the episodes/ folder reads as the run folder"
    assert _read(r1.path)[0] == [("r1e0k0", 8), ("r1e0k2", 24), ("r1e1k2", 32)], "one rank's file alone"
    rank1 = next(e for e in read_episodes(r1.path) if e.env_step == 24)
    want = dataclasses.replace(_rec(4, 24), id="r1e0k2")
    assert rank1 == want, "everything but the id is the tracker's record"


def test_the_resume_rule_applies_to_each_rank_alone(tmp_path: Path) -> None:
    """Rank 1 resumes from step 8 and drops its own later episode; rank 0's log (no resume) keeps its step 16."""
    with EpisodeLog(tmp_path, rank=0, world=2) as r0:
        r0.write([_rec(0, 8)])
        r0.write([_rec(2, 16)])
    r1 = EpisodeLog(tmp_path, rank=1, world=2)
    r1.write([_rec(0, 8)])
    r1.write([_rec(2, 16)])  # killed after this write: no gzip trailer
    with EpisodeLog(tmp_path, resume_from_step=8, rank=1, world=2) as again:
        again.write([_rec(3, 16)])
    got, report = _read(tmp_path)
    assert got == [("e0k0", 8), ("r1e0k0", 8), ("e0k1", 16), ("r1e1k1", 16)]
    assert report.superseded == 1 and report.unfinished == [r1.path.with_name("episodes-00000.jsonl.gz")]


def test_a_fresh_run_moves_aside_the_logs_of_ranks_it_does_not_have(tmp_path: Path) -> None:
    for rank in (0, 1):
        with EpisodeLog(tmp_path, rank=rank, world=2) as log:
            log.write([_rec(rank, 8)])
    with pytest.warns(UserWarning, match=r"moved its 1 file\(s\) and the logs of 1 rank\(s\) this run does not"), \
            EpisodeLog(tmp_path) as one:  # a fresh 1-process run in the same folder
        one.write([_rec(5, 4)])
    assert _read(tmp_path)[0] == [("e1k2", 4)]
    folder = tmp_path / EPISODES_DIRNAME
    [moved] = [p for p in folder.iterdir() if p.name.startswith("replaced-")]
    assert _read(moved)[0] == [("e0k0", 8), ("r1e1k0", 8)], "the earlier run's two ranks, kept together"
    with pytest.raises(ValueError, match=r"rank=2 must lie in 0 \.\. world - 1 = 1"):
        EpisodeLog(tmp_path, rank=2, world=2)


@pytest.mark.integration
def test_two_processes_log_every_episode_and_the_export_reads_them(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    result = launch([*SMALL, "logger.episodes=true"], run, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    episodes = list(read_episodes(run, on_error="raise"))
    # what the ranks collected: the trackers count each env's finished episodes (k), saved in the final checkpoints
    counts = [final_state(run, rank)["episodes"]["k"] for rank in (0, 1)]
    want = {f"{'r1' if rank else ''}e{i}k{j}" for rank, ks in enumerate(counts) for i, k in enumerate(ks)
            for j in range(k)}
    assert min(sum(k) for k in counts) > 0, "both ranks finished episodes"
    assert len(episodes) == sum(map(sum, counts)) and {e.id for e in episodes} == want
    steps = [e.env_step for e in episodes]
    assert steps == sorted(steps) and steps[-1] <= 320 and steps[0] % 8 == 0, "the run's env steps, over 2 ranks"
    assert all(re.fullmatch(r"(r1)?e\d+k\d+", e.id) for e in episodes)

    eh = load_script("export_hindsight")
    out = tmp_path / "messages.jsonl"
    assert eh.main([str(run), "--format", "messages", "--source", "oracle", "--include-successes", "--out", str(out),
                    "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"episodes read: {len(episodes)} (" in printed and "from 2 file(s)" in printed
    ids = {json.loads(line)["episode_id"] for line in out.read_text().splitlines()}
    assert ids <= want
