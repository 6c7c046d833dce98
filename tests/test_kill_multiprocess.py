"""Random SIGKILLs of a 2-process ``torchrun`` run, each followed by ``resume=auto``: the run ends with the metrics and
the episode log of an uninterrupted run.

Three kills at seeded-random moments, one of them during a checkpoint write (a checkpoint's temporary file is on
disk, and is still there after the kill). Each kill takes the whole launch down at once (``kill_run``: torchrun and
both workers, which torchrun starts in sessions of their own), as a cluster's preemption does, and checks that no
process of it is left. The others land at a random delay after the run's newest checkpoint of both ranks: during an
update, an evaluation, a metrics or episode-log write, or the next checkpoint.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sacglam.distributed import rank_dir
from sacglam.episode_log import read_episodes
from tests.test_data_parallel import ROOT, SMALL, TORCHRUN, _env, free_port, kill_run, launch
from tests.test_train import _comparable, read_metrics

ARGS = [*SMALL, "total_env_steps=480", "logger.episodes=true", "checkpoint.keep=2"]
EVERY = 80  # SMALL's checkpoint.every
KILLS = 3
SEED = 30
_TEMP = re.compile(r"^\..*step_(\d+).*\.tmp$")  # checkpoint.save_checkpoint's temporary file


def _steps(folder: Path) -> set[int]:
    """The steps of the complete checkpoints in a rank's ``checkpoints/`` folder."""
    return {int(p.stem.removeprefix("step_")) for p in folder.glob("step_*.pt")}


def _temps(folders: list[Path]) -> dict[str, int]:
    """Checkpoint temporary files (a write under way, or cut by a kill) of ``folders``: name -> step."""
    return {p.name: int(m.group(1)) for f in folders if f.is_dir() for p in f.iterdir() if (m := _TEMP.match(p.name))}


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], object], what: str, timeout: float = 240) -> None:
    """Poll ``ready`` every 5 ms until it holds; fail if the run ends first or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.005)


def _kill_once(run: Path, log: Path, during_checkpoint: bool, rng: random.Random) -> str:
    """Start the run with ``resume=auto`` and SIGKILL it once: while a checkpoint past the newest one both ranks hold
    is being written, or a random delay (0 .. 2.5 s) after both ranks hold a newer one. Returns what was done."""
    folders = [rank_dir(run, rank) / "checkpoints" for rank in (0, 1)]
    common = max(_steps(folders[0]) & _steps(folders[1]), default=0)
    stale = _temps(folders)
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "train.py"), *ARGS,
           "resume=auto", f"hydra.run.dir={run}"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=out, start_new_session=True)
    try:
        if during_checkpoint:
            def writing() -> dict[str, int]:
                return {n: s for n, s in _temps(folders).items() if n not in stale and s > common}
            _wait(proc, writing, f"checkpoint write past step {common}")
            kill_run(proc)
            assert writing(), "the kill came after the checkpoint write had finished"
            return f"killed while writing the checkpoint of step {max(writing().values())} (resumed from {common})"
        _wait(proc, lambda: max(_steps(folders[0]) & _steps(folders[1]), default=0) > common,
              f"checkpoint past step {common}")
        delay = rng.uniform(0, 2.5)
        time.sleep(delay)
        kill_run(proc)
        return f"killed {delay:.2f} s after a checkpoint past step {common}"
    finally:
        if proc.poll() is None:
            kill_run(proc)


@pytest.mark.slow
@pytest.mark.ci
def test_random_sigkills_of_two_processes_then_resume_match(tmp_path: Path) -> None:
    start = time.monotonic()
    reference = tmp_path / "reference"
    result = launch(ARGS, reference, 2)
    assert result.returncode == 0, result.stderr[-3000:]

    rng = random.Random(SEED)
    at_checkpoint = rng.randrange(KILLS)
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    done = [_kill_once(run, log, k == at_checkpoint, rng) for k in range(KILLS)]
    assert not (run / "success.png").exists(), f"the run finished before a kill: {done}"
    result = launch([*ARGS, "resume=auto"], run, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout

    assert _comparable(read_metrics(run)) == _comparable(read_metrics(reference)), done
    want = [e.to_json() for e in read_episodes(reference, on_error="raise")]
    # a kill during a write can cut the log's last line: it was logged after the checkpoint resumed from, so the
    # resumed run logs that episode again and the cut line is skipped
    assert [e.to_json() for e in read_episodes(run, on_error="skip")] == want, done
    print(f"{'; '.join(done)}; {time.monotonic() - start:.0f} s in all")
