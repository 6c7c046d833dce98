"""One command for a machine with one GPU: run, within 8 minutes, everything this project has never run on CUDA, and
write one markdown report (issue 28).

    python scripts/gpu_check.py                          # every step; the report goes to docs/gpu_check.md
    python scripts/gpu_check.py --out /tmp/gpu.md --logs /tmp/gpu-logs   # elsewhere, with every step's full output
    python scripts/gpu_check.py --only bench-tiny train-resume           # some steps (the others: skipped)
    python scripts/gpu_check.py --list                   # the steps, their commands and timeouts; runs nothing
    make gpu-check ARGS="--out /tmp/gpu.md"              # the same through the Makefile

The steps (:func:`gpu_steps`), each a subprocess with its own timeout, so that a step that fails or hangs is reported
(a hung one is killed with its whole process group) and the next one still runs; the timeouts add up to less than
:data:`BUDGET_S`:

1. ``gpu-tests``: the ``gpu``-marked tests (``pytest -m gpu``: CUDA checkpoints and RNG, bf16 scoring against the
   naive scorer, the replay buffer's sampling with no host sync);
2. ``bench-buffer``: the replay buffer's add and sample on the GPU against Stable-Baselines3's ``HerReplayBuffer``
   (``scripts/bench_buffer.py --device cuda``, a reduced capacity), with the ratio to the 100x sampling goal;
3. ``bench-<model>``: ``scripts/bench.py --device cuda`` for the tiny model and the three real shapes (random init
   from their configs, bf16, LoRA r=16): env steps/s, update tok/s and MFU, one step per model;
4. ``bench-memory``: ``scripts/bench_memory.py --device cuda``: one SAC update's peak GPU memory
   (``torch.cuda.max_memory_allocated``) and time, old against lean scoring;
5. ``train-resume``: ``train.py device=cuda`` killed (SIGKILL) once its first checkpoint is written, then run again
   with ``resume=auto`` (this script's ``--train-resume``): the run must continue from the checkpoint to its end,
   the metrics file keeping its rows up to the checkpoint.

The report names the device (``torch.cuda.get_device_name``), the torch and CUDA versions, and gives each step's
command, result (pass, fail, timeout or skipped), wall time and the lines of its output worth reading (the
benchmark tables; the output's tail for a step that failed). Without a GPU the command prints ``no GPU: nothing to
check`` and exits 0 without writing anything: first without importing torch when the machine has no GPU device node
at all (so it answers in well under a second), then by ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "gpu_check.md"
BUDGET_S = 480.0  # the whole check, every step timing out included (issue 28: "within 8 minutes")
RUNNER_MARGIN_S = 20.0  # what the runner itself may spend (imports, the device query, the report) within BUDGET_S
BUFFER_GOAL = 100.0  # the GPU sampler's goal: sampled transitions/s >= 100x Stable-Baselines3's (docs/benchmarks.md)
TAIL_LINES = 40  # lines of output shown for a step that did not pass
STATUSES = ("pass", "fail", "timeout", "skipped")


# ---------------------------------------------------------------------------------------------------------------------
# steps and their results


class Parsed(NamedTuple):
    """What a step's output says: a one-line summary for the report's table, and the lines worth reading (lines that
    start with ``|`` are markdown table rows and go into the report as they are; the others go into a code block)."""

    summary: str
    lines: list[str]


@dataclass(frozen=True)
class Step:
    """One step of the check: ``python *argv`` run from the repository root, killed after ``timeout_s`` seconds.

    Attributes:
        name: short name (``--only`` selects by it).
        argv: the command's arguments after the Python interpreter (``("-m", "pytest", ...)``, ``("scripts/x.py",
            ...)``): it runs with this script's interpreter, in the repository root.
        timeout_s: wall-clock limit in seconds; past it the step's whole process group is killed.
        parse: the step's output (stdout and stderr together) -> :class:`Parsed`.
        what: one sentence for the report: what the step checks.
        requires: modules the step needs; when one is missing the step is skipped and the report says which.
    """

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    parse: Callable[[str], Parsed]
    what: str = ""
    requires: tuple[str, ...] = ()

    def command(self) -> str:
        """The command as a person would type it (``python ...``)."""
        return shlex.join(["python", *self.argv])


@dataclass
class Result:
    """The outcome of one :class:`Step`: ``status`` is one of :data:`STATUSES`."""

    step: Step
    status: str
    seconds: float
    returncode: int | None = None
    output: str = ""
    parsed: Parsed = field(default_factory=lambda: Parsed("", []))
    note: str = ""  # why a step was skipped, or where its full log is


def tail(output: str, n: int = TAIL_LINES) -> Parsed:
    """The default parser: the last line as the summary and the last ``n`` lines."""
    lines = output.rstrip().splitlines()
    return Parsed(lines[-1].strip() if lines else "", lines[-n:])


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL ``proc``'s process group (it was started as a session leader, so the group is its own)."""
    with contextlib.suppress(ProcessLookupError):  # (already gone)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def step_env() -> dict[str, str]:
    """The environment of every step: this one, offline, unbuffered (a killed step still shows its last lines)."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    env.setdefault("WANDB_MODE", "disabled")
    return env


def run_step(step: Step, cwd: Path, log_dir: Path | None = None) -> Result:
    """Run one step in its own process group, its output into a file; kill the group at the timeout.

    The output goes to a file rather than a pipe, so that a grandchild that outlives a kill cannot hold the runner,
    and the lines a killed step printed are kept.

    Returns:
        The step's :class:`Result` (``skipped`` when a module of ``step.requires`` is missing).
    """
    missing = [m for m in step.requires if importlib.util.find_spec(m) is None]
    if missing:
        return Result(step, "skipped", 0.0, note=f"not installed: {', '.join(missing)} (pip install -e '.[dev]')")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{step.name}.log", "w+")  # noqa: SIM115 (closed below, after the read)
    else:
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115
    with log:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, *step.argv], cwd=cwd, env=step_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group, killed whole at the timeout
        try:
            proc.wait(timeout=step.timeout_s)
            status = "pass" if proc.returncode == 0 else "fail"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = "timeout"
        seconds = time.monotonic() - t0
        log.seek(0)
        output = log.read()
    try:
        parsed = step.parse(output)
    except Exception as exc:  # a parser bug must not lose the step's result
        parsed = Parsed(f"(the output could not be parsed: {exc!r})", output.splitlines()[-TAIL_LINES:])
    note = f"full output: {log_dir / (step.name + '.log')}" if log_dir is not None else ""
    return Result(step, status, seconds, proc.returncode, output, parsed, note)


def _echo(line: str) -> None:
    print(line, flush=True)


def run_steps(steps: Sequence[Step], cwd: Path, log_dir: Path | None = None, only: Sequence[str] = (),
              echo: Callable[[str], None] = _echo) -> list[Result]:  # fmt: skip
    """Run ``steps`` one after the other (every one, whatever the previous ones did); those not in ``only`` (when
    given) are skipped. ``echo`` gets one progress line per step."""
    results = []
    for i, step in enumerate(steps, 1):
        if only and step.name not in only:
            results.append(Result(step, "skipped", 0.0, note="not selected (--only)"))
            continue
        echo(f"[gpu-check] {i}/{len(steps)} {step.name} (timeout {step.timeout_s:.0f} s): {step.command()}")
        r = run_step(step, cwd, log_dir)
        echo(f"[gpu-check] {i}/{len(steps)} {step.name}: {r.status} in {r.seconds:.1f} s"
             f"{': ' + r.parsed.summary if r.parsed.summary else ''}{' (' + r.note + ')' if r.note else ''}")
        results.append(r)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# the report


def _blocks(lines: Sequence[str]) -> list[str]:
    """``lines`` as markdown: runs of table rows (``|`` first) as they are, the other runs in code blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        table = lines[i].lstrip().startswith("|")
        j = i
        while j < len(lines) and lines[j].lstrip().startswith("|") == table:
            j += 1
        chunk = [x.strip() for x in lines[i:j]] if table else list(lines[i:j])
        out += ["", *chunk, ""] if table else ["", "```", *chunk, "```", ""]
        i = j
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(results: Sequence[Result], device: dict[str, str], total_s: float, command: str) -> str:
    """The markdown report: the device, a table of every step (result, time, summary), then each step's command and
    the lines of its output worth reading (the output's tail as well for a step that did not pass)."""
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines = [
        "# GPU check (`make gpu-check`)",
        "",
        f"Device: **{device['name']}**; {device['details']}. Written {device['date']} by `{command}` "
        f"(commit {device['commit']}); {total_s:.0f} s in all (budget {BUDGET_S:.0f} s).",
        "",
        "Result: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + ".",
        "",
        "| # | step | result | time (s) | timeout (s) | summary |",
        "|---:|---|---|---:|---:|---|",
    ]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {r.step.name} | {r.status} | {r.seconds:.1f} | {r.step.timeout_s:.0f} "
                     f"| {_cell(r.parsed.summary or r.note)} |")  # fmt: skip
    for i, r in enumerate(results, 1):
        lines += ["", f"## {i}. {r.step.name}: {r.status} ({r.seconds:.1f} s)", ""]
        if r.step.what:
            lines += [r.step.what, ""]
        lines.append(f"Command: `{r.step.command()}` (timeout {r.step.timeout_s:.0f} s)"
                     f"{'; exit code ' + str(r.returncode) if r.returncode not in (None, 0) else ''}"
                     f"{'; killed at the timeout' if r.status == 'timeout' else ''}."
                     f"{' ' + r.note[0].upper() + r.note[1:] + '.' if r.note else ''}")  # fmt: skip
        lines += _blocks(r.parsed.lines)
        if r.status in ("fail", "timeout"):
            shown = set(r.parsed.lines)
            rest = [x for x in r.output.rstrip().splitlines()[-TAIL_LINES:] if x not in shown]
            if rest:
                lines += ["", "The output's last lines:", "", "```", *rest, "```"]
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# the output parsers of the real steps


def parse_pytest(output: str) -> Parsed:
    """pytest ``-rA``: every test's outcome line and the final count line (a GPU that skips every test is flagged)."""
    lines = output.rstrip().splitlines()
    outcome = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
    kept = [x for x in lines if outcome.match(x)]
    final = next((x.strip("= ") for x in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", x)), "")
    summary = final or (lines[-1] if lines else "")
    if "passed" not in final and "skipped" in final:
        summary += " (every gpu test skipped: CUDA not seen by the tests?)"
    return Parsed(summary, [*kept, final] if final else kept)


def parse_bench_buffer(output: str) -> Parsed:
    """bench_buffer.py: its table and the ratio line, and the sampler's ratio to SB3 against the 100x goal."""
    lines = output.rstrip().splitlines()
    kept = [x for x in lines if x.startswith(("|", "capacity ", "built ", "ratio "))]
    m = re.search(r"add ([\d.]+)x, sample ([\d.]+)x, sample into out= ([\d.]+)x", output)
    if m is None:
        return Parsed("no ratio line in the output", kept)
    add, new, out = (float(g) for g in m.groups())
    best = max(new, out)
    verdict = "met" if best >= BUFFER_GOAL else f"not met ({best / BUFFER_GOAL:.2f} of it)"
    goal = (f"GPU sampling goal, >= {BUFFER_GOAL:.0f}x SB3's sampled transitions/s: {verdict}; new batch per call "
            f"{new:.1f}x, into out= {out:.1f}x; add {add:.2f}x SB3")
    return Parsed(f"sample {new:.1f}x SB3, into out= {out:.1f}x (goal {BUFFER_GOAL:.0f}x: {verdict}); add {add:.2f}x",
                  [*kept, goal])


def parse_bench(output: str) -> Parsed:
    """bench.py: its header and table, summarised as env steps/s, update tok/s and MFU of the row."""
    lines = output.rstrip().splitlines()
    rows = [x for x in lines if x.startswith("|")]
    kept = [x for x in lines if x.startswith(("[bench]", "SAC training throughput"))] + rows
    if len(rows) < 3:
        return Parsed("no result table in the output", kept)
    keys = [c.strip() for c in rows[0].strip("|").split("|")]
    summaries = []
    for row in rows[2:]:
        cell = dict(zip(keys, (c.strip() for c in row.strip("|").split("|")), strict=False))
        summaries.append(f"{cell.get('model')}: {cell.get('env steps/s')} env steps/s, {cell.get('update tok/s')} "
                         f"update tok/s, MFU {cell.get('MFU %')}%, grad accum {cell.get('grad accum')}")  # fmt: skip
    return Parsed("; ".join(summaries), kept)


def parse_bench_memory(output: str) -> Parsed:
    """bench_memory.py: one line per measured run, the header and the table."""
    lines = output.rstrip().splitlines()
    runs = [x for x in lines if x.startswith("[bench_memory]")]
    rows = [x for x in lines if x.startswith("|")]
    header = [x for x in lines if x.startswith("One SAC update")]
    summary = "; ".join(x.removeprefix("[bench_memory] ").split(" (process")[0] for x in runs)
    return Parsed(summary or "no measured run in the output", [*runs, *header, *rows])


def parse_lines_with(prefix: str) -> Callable[[str], Parsed]:
    """A parser keeping the lines that start with ``prefix``; the last of them is the summary."""

    def parse(output: str) -> Parsed:
        kept = [x for x in output.rstrip().splitlines() if x.startswith(prefix)]
        return Parsed(kept[-1].removeprefix(prefix).strip() if kept else "", kept)

    return parse


# ---------------------------------------------------------------------------------------------------------------------
# the real step list


def _pytest_argv() -> tuple[str, ...]:
    """``pytest -m gpu`` with every outcome listed; in one process when pytest-xdist is installed (``-n 0``)."""
    xdist = ("-n", "0") if importlib.util.find_spec("xdist") is not None else ()
    return ("-m", "pytest", "-q", "-rA", "-m", "gpu", "-p", "no:cacheprovider", *xdist, "tests")


def gpu_steps() -> list[Step]:
    """The check's steps, in the order they run (their timeouts add up to at most ``BUDGET_S - RUNNER_MARGIN_S``)."""
    bench = ("scripts/bench.py", "--device", "cuda")
    # Shorter untimed warm-up than published (32 vector steps: enough completed episodes for a batch of 256; one
    # critic warm-up update and one full one); the timed loop keeps the published settings.
    warm = ("--warmup-updates", "1", "learning_starts=1024", "algo.critic_warmup_updates=1")
    steps = [
        Step("gpu-tests", _pytest_argv(), 45, parse_pytest, "The `gpu`-marked tests (they skip without CUDA).",
             requires=("pytest",)),
        Step("bench-buffer", ("scripts/bench_buffer.py", "--device", "cuda", "--capacity", "100000", "--rounds", "10",
                              "--threads", "1"), 45, parse_bench_buffer,
             "The replay buffer's add and sample on the GPU (torch path) against Stable-Baselines3's "
             "`HerReplayBuffer` sampling to the same GPU, capacity 100k (not 500k, for time).",
             requires=("stable_baselines3",)),
    ]
    # (model, timed vector steps, timeout, micro-batches): Flan-T5 and Qwen start with the batch of 256 in two
    # micro-batches (the same update), since their activations for 256 states in one pass are estimated at about
    # 50-60 GB in bf16 and an out-of-memory retry rebuilds the whole loop, which the timeout could not pay for.
    for model, n, timeout, accum in (("tiny", 40, 40, 1), ("flan-t5-base", 20, 60, 2), ("smollm2-135m", 20, 55, 1),
                                     ("qwen2.5-0.5b", 20, 75, 2)):  # fmt: skip
        shape = "the tiny model" if model == "tiny" else f"a random-init {model} shape (LoRA r=16)"
        steps.append(Step(f"bench-{model}", (*bench, "--models", model, "--steps", str(n), *warm,
                                             f"algo.grad_accum={accum}"), timeout, parse_bench,
                          f"`bench.py` with {shape} in bf16, published settings (32 envs, batch 256 in {accum} "
                          f"micro-batch(es), replay ratio 4) with a shorter untimed warm-up, {n} timed vector steps "
                          f"({n // 2} updates)."))  # fmt: skip
    steps += [
        Step("bench-memory", ("scripts/bench_memory.py", "--device", "cuda", "--models", "qwen2.5-0.5b",
                              "flan-t5-base", "--grad-accum", "4", "--warmup", "1"), 70, parse_bench_memory,
             "One SAC update's peak GPU memory (`torch.cuda.max_memory_allocated`) and time, old against lean "
             "scoring, full-depth bf16 shapes, 256 states in 4 micro-batches of 64, after one untimed update."),
        Step("train-resume", ("scripts/gpu_check.py", "--train-resume", "--device", "cuda"), 70,
             parse_lines_with("[train-resume]"),
             "`train.py device=cuda` (tiny model, Playground) killed once its first checkpoint is written, then "
             "run again with `resume=auto` to its end."),
    ]
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# the train.py step: interrupt, then resume=auto (``--train-resume``)

# A short Playground run of the tiny model: 2 updates per vector step from step 32 on, a checkpoint every 64 env steps.
TRAIN_ARGS = ("env.num_envs=8", "batch_size=16", "learning_starts=32", "total_env_steps=160", "checkpoint.every=64",
              "checkpoint.keep=2", "eval.every=0", "eval.episodes_per_category=2", "eval.num_envs=2",
              "env.corpus_episodes=20", "time_limit_min=0", "logger.progress=false", "seed=0")  # fmt: skip
KILL_AT = 64  # env step of the checkpoint after which the first run is killed
TOTAL = 160


def _say(message: str) -> None:
    print(f"[train-resume] {message}", flush=True)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (a line cut short by a kill is left out)."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def interrupt_after_checkpoint(cmd: list[str], checkpoint: Path, log: Path, timeout_s: float) -> bool:
    """Start ``cmd`` and SIGKILL it as soon as ``checkpoint`` exists. Returns False (and says why) when the run ended
    or ran out of time first."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=step_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        t0 = time.monotonic()
        while not checkpoint.exists():
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                ended = f"ended with exit code {proc.returncode}" if proc.returncode is not None else "timed out"
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
                _say(f"FAIL: run 1 {ended} before {checkpoint.name} was written; its last lines:")
                print("\n".join(log.read_text().splitlines()[-TAIL_LINES:]), flush=True)
                return False
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    _say(f"interrupted: SIGKILL {time.monotonic() - t0:.1f} s after the start, once {checkpoint.name} was written")
    return True


def check_resumed(before: list[dict[str, Any]], after: list[dict[str, Any]], stdout: str) -> list[str]:
    """What is wrong with the resumed run (nothing: an empty list).

    Args:
        before: the metrics rows at the kill; after: the rows at the end of the resumed run.
        stdout: the resumed run's standard output.
    """
    problems = []
    if "resumed from" not in stdout or f"at env step {KILL_AT}" not in stdout:
        problems.append(f"the resumed run did not print 'resumed from ... at env step {KILL_AT}'")
    kept = [r for r in before if r["step"] <= KILL_AT]
    if after[: len(kept)] != kept:
        problems.append(f"the metrics rows up to step {KILL_AT} changed on resume")
    steps = [r["step"] for r in after]
    # One row per vector step, and the final evaluation's row at the last step again.
    if not steps or steps != sorted(steps) or len(set(steps[:-1])) != len(steps) - 1 or steps[-1] != TOTAL:
        problems.append(f"the metrics steps do not increase row by row to {TOTAL}: {steps}")
    if not any("losses/critic" in r for r in kept):
        problems.append("no update was logged before the kill")
    if not any("losses/critic" in r for r in after if r["step"] > KILL_AT):
        problems.append("no update was logged after the resume")
    if not any("eval/greedy/success" in r for r in after):
        problems.append("no final evaluation was logged")
    return problems


def train_resume(device: str, run_dir: Path, timeout_s: float) -> int:
    """``train.py`` on ``device`` killed after its checkpoint of :data:`KILL_AT`, then resumed to :data:`TOTAL`.

    Returns:
        0 when the resumed run continued from the checkpoint to its end (:func:`check_resumed`), 1 otherwise.
    """
    from sacglam.checkpoint import checkpoint_path

    cmd = [sys.executable, str(ROOT / "train.py"), f"device={device}", *TRAIN_ARGS, f"hydra.run.dir={run_dir}"]
    _say(f"run 1: python train.py {shlex.join(cmd[2:])}")
    deadline = time.monotonic() + timeout_s
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not interrupt_after_checkpoint(cmd, checkpoint_path(run_dir, KILL_AT), run_dir.parent / "run1.log", timeout_s):
        return 1
    before = read_metrics(run_dir)
    _say(f"metrics.jsonl at the kill: {len(before)} rows, last step {before[-1]['step'] if before else None}")
    t0 = time.monotonic()
    try:
        proc = subprocess.run([*cmd, "resume=auto"], cwd=ROOT, env=step_env(), capture_output=True, text=True,
                              timeout=max(1.0, deadline - t0), check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        _say("FAIL: the resumed run (resume=auto) did not end in time")
        return 1
    resumed = next((x for x in proc.stdout.splitlines() if "resumed from" in x), "(no 'resumed from' line)")
    _say(f"run 2 (resume=auto): exit code {proc.returncode} in {time.monotonic() - t0:.1f} s; {resumed.strip()}")
    if proc.returncode != 0:
        _say("FAIL: the resumed run failed; its last lines:")
        print("\n".join((proc.stdout + proc.stderr).splitlines()[-TAIL_LINES:]), flush=True)
        return 1
    after = read_metrics(run_dir)
    problems = check_resumed(before, after, proc.stdout)
    for p in problems:
        _say(f"FAIL: {p}")
    if problems:
        return 1
    kept = sum(r["step"] <= KILL_AT for r in after)
    _say(f"pass: resumed at env step {KILL_AT} and ran to {TOTAL} on {device}; metrics.jsonl kept its {kept} rows up "
         f"to step {KILL_AT} and grew to {len(after)} rows (updates logged before and after the kill)")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# the device


GPU_NODES = ("/dev/nvidia*", "/dev/dxg", "/dev/kfd", "/proc/driver/nvidia")  # NVIDIA, WSL 2, ROCm


def has_gpu_node() -> bool:
    """Whether the machine has a GPU device node (:data:`GPU_NODES`); without one, CUDA cannot be available, and
    the answer comes without importing torch."""
    return any(glob.glob(p) for p in GPU_NODES)


def device_info() -> dict[str, Any]:
    """``{"available": False, "why": ...}``, or the GPU's name and details (for the report's first line)."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "why": f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA "
                                            f"build {torch.version.cuda})"}  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    driver = ""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        driver = f", driver {smi.stdout.splitlines()[0].strip()}"
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    details = (f"{props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
               f"{torch.cuda.device_count()} GPU(s) visible; torch {torch.__version__}, CUDA {torch.version.cuda}"
               f"{driver}, cuDNN {torch.backends.cudnn.version()}; Python {platform.python_version()}, "
               f"{os.cpu_count()} CPU cores")  # fmt: skip
    return {"available": True, "name": torch.cuda.get_device_name(0), "details": details}


def probe_device(timeout_s: float = 120) -> dict[str, Any]:
    """:func:`device_info` from a subprocess, so that this runner never holds a CUDA context while the steps run."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--device-info"], capture_output=True,
                          text=True, timeout=timeout_s, env=step_env(), check=False)  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"available": False, "why": f"the device query failed: {(proc.stdout + proc.stderr)[-2000:]}"}
    info: dict[str, Any] = json.loads(lines[-1])
    return info


def _commit() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        return proc.stdout.strip() + (" with local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# main


def check(steps: Sequence[Step], device: dict[str, Any], out: Path, log_dir: Path | None = None,
          only: Sequence[str] = (), command: str = "python scripts/gpu_check.py") -> list[Result]:  # fmt: skip
    """Run ``steps`` and write the report to ``out`` (``device``: :func:`device_info`'s answer)."""
    t0 = time.monotonic()
    results = run_steps(steps, ROOT, log_dir, only)
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
            **{k: str(v) for k, v in device.items()}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(results, info, time.monotonic() - t0, command))
    print(f"[gpu-check] report written to {out}: " + ", ".join(f"{r.step.name} {r.status}" for r in results))
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (the ``--train-resume`` and ``--device-info`` modes are the steps' own)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the report (default: docs/gpu_check.md)")
    p.add_argument("--logs", type=Path, default=None, help="also keep every step's full output in this folder")
    p.add_argument("--only", nargs="+", default=(), metavar="STEP", help="run these steps only (names: --list)")
    p.add_argument("--list", action="store_true", help="print the steps, their commands and timeouts, and exit")
    p.add_argument("--train-resume", action="store_true",
                   help="(a step) train.py killed after a checkpoint, then resume=auto; exit 1 if it did not continue")
    p.add_argument("--device", default="cuda", help="--train-resume's device (cpu to try it here)")
    p.add_argument("--run-dir", type=Path, default=None, help="--train-resume's run folder (default: a temporary one)")
    p.add_argument("--device-info", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Check the GPU (or say there is none), write the report; the exit code is 1 when a step failed or timed out."""
    opts = parse_args(argv)
    if opts.device_info:
        print(json.dumps(device_info()))
        return 0
    if opts.train_resume:
        if opts.run_dir is not None:
            return train_resume(opts.device, opts.run_dir, timeout_s=600)
        with tempfile.TemporaryDirectory(prefix="sacglam-gpu-check-") as tmp:
            return train_resume(opts.device, Path(tmp) / "run", timeout_s=600)
    steps = gpu_steps()
    unknown = sorted(set(opts.only) - {s.name for s in steps})
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {unknown}; the steps are {[s.name for s in steps]}")
    if opts.list:
        for s in steps:
            print(f"{s.name} (timeout {s.timeout_s:.0f} s): {s.command()}")
        print(f"timeouts in all: {sum(s.timeout_s for s in steps):.0f} s (budget {BUDGET_S:.0f} s)")
        return 0
    if not has_gpu_node():
        print(f"no GPU: nothing to check (no GPU device node: none of {', '.join(GPU_NODES)}); no report written")
        return 0
    device = probe_device()
    if not device.get("available"):
        print(f"no GPU: nothing to check ({device.get('why')}); no report written")
        return 0
    print(f"[gpu-check] {device['name']}: {device['details']}", flush=True)
    command = shlex.join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    results = check(steps, device, opts.out, opts.logs, opts.only, command)
    return 1 if any(r.status in ("fail", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
