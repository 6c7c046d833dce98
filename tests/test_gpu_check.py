"""``scripts/gpu_check.py`` (``make gpu-check``) on CPU: the runner with fake steps (a failing step and a step past
its timeout are reported and the next step still runs; the report lists every step and names the device), the
command without a GPU, the real step list and its commands' arguments, and the parsers of the steps' outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.scripts_util import SCRIPTS, load_script

gpu_check = load_script("gpu_check")
Step, tail = gpu_check.Step, gpu_check.tail
ROOT = SCRIPTS.parent


def py(code: str, name: str, timeout_s: float = 60) -> Any:
    """A fake step: ``python -c code``."""
    return Step(name, ("-c", code), timeout_s, tail, what=f"the fake step {name}")


def _dead(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (a killed orphan may wait to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_failed_step_is_reported_and_the_next_step_runs(tmp_path: Path) -> None:
    steps = [py("import sys; print('about to fail'); sys.exit(3)", "boom"), py("print('fine')", "after")]
    echoed: list[str] = []
    results = gpu_check.run_steps(steps, tmp_path, log_dir=tmp_path / "logs", echo=echoed.append)
    assert [r.status for r in results] == ["fail", "pass"]
    assert results[0].returncode == 3 and results[0].output.strip() == "about to fail"
    assert results[1].returncode == 0 and results[1].parsed.summary == "fine"
    assert (tmp_path / "logs" / "boom.log").read_text().strip() == "about to fail"
    assert any("boom: fail" in line for line in echoed) and any("after: pass" in line for line in echoed)


def test_step_past_its_timeout_is_killed_with_its_process_group_and_the_next_step_runs(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    results = gpu_check.run_steps([py(hang, "hang", timeout_s=3), py("print('after')", "after")], tmp_path,
                                  echo=lambda _: None)  # fmt: skip
    assert [r.status for r in results] == ["timeout", "pass"]
    assert results[0].output.strip() == "started"  # what the killed step printed is kept
    assert results[1].output.strip() == "after"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _dead(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(grandchild), "the step's own child outlived the kill of its process group"


def test_missing_module_skips_the_step_and_the_next_step_runs(tmp_path: Path) -> None:
    steps = [Step("needs", ("-c", "print(1)"), 60, tail, requires=("no_such_module_xyz",)), py("print(2)", "next")]
    results = gpu_check.run_steps(steps, tmp_path, echo=lambda _: None)
    assert [r.status for r in results] == ["skipped", "pass"]
    assert "no_such_module_xyz" in results[0].note


def test_report_lists_every_step_with_its_result_and_time_and_names_the_device(tmp_path: Path) -> None:
    table = "print('| model | env steps/s |'); print('|---|---|'); print('| tiny | 12.5 |')"
    steps = [py(table, "table"), py("import sys; print('bad value'); sys.exit(1)", "failing"),
             py("import time; print('waiting', flush=True); time.sleep(60)", "hanging", timeout_s=2),
             py("print('never run')", "unselected")]  # fmt: skip
    device = {"name": "Fake GPU 9000", "details": "80 GiB, torch 9.9, CUDA 99.9"}
    out = tmp_path / "report" / "gpu_check.md"
    results = gpu_check.check(steps, device, out, only=["table", "failing", "hanging"])
    assert [r.status for r in results] == ["pass", "fail", "timeout", "skipped"]
    report = out.read_text()
    assert "Device: **Fake GPU 9000**; 80 GiB, torch 9.9, CUDA 99.9." in report
    assert "Result: 1 pass, 1 fail, 1 timeout, 1 skipped." in report
    for i, (name, status) in enumerate(zip(["table", "failing", "hanging", "unselected"],
                                           ["pass", "fail", "timeout", "skipped"], strict=True), 1):  # fmt: skip
        assert re.search(rf"^\| {i} \| {name} \| {status} \| \d+\.\d \| \d+ \|", report, re.M), name
        assert f"## {i}. {name}: {status} (" in report
    assert "\n| tiny | 12.5 |\n" in report  # a table row of the output goes in as markdown
    assert "exit code 1" in report and "bad value" in report  # the failed step's output
    assert "killed at the timeout" in report and "waiting" in report
    assert "Not selected (--only)." in report


def test_without_a_gpu_the_command_says_so_exits_0_and_writes_nothing(tmp_path: Path) -> None:
    if gpu_check.has_gpu_node():
        pytest.skip("this machine has a GPU device node: the command would run the check")
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no GPU: nothing to check (no GPU device node") and not out.exists()


def test_device_node_without_cuda_asks_torch_then_says_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the command would run the check")
    monkeypatch.setattr(gpu_check, "has_gpu_node", lambda: True)  # as on a machine whose driver does not answer
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("no GPU: nothing to check (torch.cuda.is_available() is False") and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# the real step list


def test_real_steps_are_well_formed() -> None:
    steps = gpu_check.gpu_steps()
    names = [s.name for s in steps]
    assert len(set(names)) == len(names)
    assert names[0] == "gpu-tests" and names[-1] == "train-resume"
    assert sum(s.timeout_s for s in steps) <= gpu_check.BUDGET_S - gpu_check.RUNNER_MARGIN_S <= 8 * 60
    for s in steps:
        assert s.timeout_s > 0 and s.what
        if s.argv[0] != "-m":
            assert (ROOT / s.argv[0]).is_file(), s.argv[0]
            assert "--device" in s.argv and s.argv[s.argv.index("--device") + 1] == "cuda", s.name
    bench = load_script("bench")
    models = {s.argv[s.argv.index("--models") + 1] for s in steps if s.argv[0] == "scripts/bench.py"}
    assert models == {"tiny", *bench.GPU_MODELS}
    pytest_step = steps[0]
    assert pytest_step.argv[:2] == ("-m", "pytest") and "gpu" in pytest_step.argv
    assert any("@pytest.mark.gpu" in p.read_text() for p in (ROOT / "tests").glob("test_*.py"))


def test_real_step_commands_parse_on_cpu() -> None:
    """Every benchmark step's flags are accepted by its script (on CPU the scripts stop at the missing GPU, after
    parsing), and its Hydra overrides compose, so that a typo cannot wait for a GPU to be found."""
    import torch

    from sacglam.run.tools import compose_config, published_config

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the scripts would run")
    steps = {s.name: s for s in gpu_check.gpu_steps()}
    bench, bench_memory, bench_buffer = (load_script(n) for n in ("bench", "bench_memory", "bench_buffer"))
    for name, step in steps.items():
        if step.argv[0] == "scripts/bench.py":
            with pytest.raises(SystemExit, match="no CUDA device"):
                bench.main(list(step.argv[1:]))
            overrides = [a for a in step.argv if "=" in a]
            assert published_config(overrides).env.num_envs == 32, name
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_memory.main(list(steps["bench-memory"].argv[1:]))
    args = bench_buffer.parse_args(list(steps["bench-buffer"].argv[1:]))
    assert (args.device, args.capacity, bench_buffer.thread_counts(args.threads)) == ("cuda", 100_000, [1])
    resume = gpu_check.parse_args(list(steps["train-resume"].argv[1:]))
    assert resume.train_resume and resume.device == "cuda"
    cfg = compose_config(["device=cuda", *gpu_check.TRAIN_ARGS])
    assert (cfg.total_env_steps, cfg.checkpoint.every) == (gpu_check.TOTAL, gpu_check.KILL_AT)
    assert cfg.learning_starts < gpu_check.KILL_AT < gpu_check.TOTAL  # updates run before the kill and after it


# ---------------------------------------------------------------------------------------------------------------------
# the parsers of the steps' outputs and the resume check


def test_parse_bench_buffer_gives_the_ratio_to_the_100x_goal() -> None:
    out = "built SB3: add 1/s\n| buffer | threads |\n|---|---|\n| ours | 1 |\n\nratio (first row / SB3): add 0.25x, " \
          "sample 120.0x, sample into out= 80.5x, bytes 0.57x\n"  # fmt: skip
    parsed = gpu_check.parse_bench_buffer(out)
    assert parsed.summary == "sample 120.0x SB3, into out= 80.5x (goal 100x: met); add 0.25x"
    assert parsed.lines[:4] == ["built SB3: add 1/s", "| buffer | threads |", "|---|---|", "| ours | 1 |"]
    low = gpu_check.parse_bench_buffer(out.replace("120.0x", "40.0x"))
    assert low.summary == "sample 40.0x SB3, into out= 80.5x (goal 100x: not met (0.81 of it)); add 0.25x"
    assert gpu_check.parse_bench_buffer("Traceback ...").summary == "no ratio line in the output"


def test_parse_bench_summarises_the_table() -> None:
    out = (
        "[bench] tiny: 86,400 params\nnoise\nSAC training throughput on NVIDIA X (16 threads) ...\n\n"
        "| model | grad accum | env steps/s | update tok/s | MFU % |\n|---|---|---|---|---|\n"
        "| tiny | 1 | 22.6 | 15,599 | 8.42 |\n"
    )
    parsed = gpu_check.parse_bench(out)
    assert parsed.summary == "tiny: 22.6 env steps/s, 15,599 update tok/s, MFU 8.42%, grad accum 1"
    assert parsed.lines[0] == "[bench] tiny: 86,400 params"
    assert parsed.lines[-1] == "| tiny | 1 | 22.6 | 15,599 | 8.42 |"
    assert "noise" not in parsed.lines
    assert gpu_check.parse_bench("[bench] tiny: out of memory").summary == "no result table in the output"


def test_parse_pytest_keeps_outcomes_and_flags_all_skipped() -> None:
    out = "..s\nPASSED tests/a.py::t1\nSKIPPED [1] tests/b.py:3: needs CUDA\n===== 2 passed, 1 skipped in 3.1s =====\n"
    parsed = gpu_check.parse_pytest(out)
    assert parsed.summary == "2 passed, 1 skipped in 3.1s"
    assert parsed.lines == ["PASSED tests/a.py::t1", "SKIPPED [1] tests/b.py:3: needs CUDA",
                            "2 passed, 1 skipped in 3.1s"]  # fmt: skip
    skipped = gpu_check.parse_pytest("sss\n===== 3 skipped, 600 deselected in 9.0s =====\n")
    assert skipped.summary == "3 skipped, 600 deselected in 9.0s (every gpu test skipped: CUDA not seen by the tests?)"


def _rows(last: int, losses_from: int, final: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"step": s, **({"losses/critic": 0.5} if s >= losses_from else {})}
                                  for s in range(8, last + 1, 8)]  # fmt: skip
    return [*rows, {"step": last, "eval/greedy/success": 0.25}] if final else rows


def test_check_resumed_accepts_a_continued_run_and_names_each_problem() -> None:
    before = [*_rows(64, 40, final=False), {"step": 72}]  # a row written after the checkpoint, then the kill
    after = _rows(gpu_check.TOTAL, 40)
    stdout = "resumed from RUN/checkpoints/step_0000000064.pt at env step 64\n"
    assert gpu_check.check_resumed(before, after, stdout) == []
    assert gpu_check.check_resumed(before, after, "") == [
        "the resumed run did not print 'resumed from ... at env step 64'"]
    changed = [{**r, "losses/critic": 9.0} if r["step"] == 48 else r for r in after]
    assert gpu_check.check_resumed(before, changed, stdout) == ["the metrics rows up to step 64 changed on resume"]
    short = _rows(152, 40)
    assert gpu_check.check_resumed(before, short, stdout)[0].startswith("the metrics steps do not increase")
    assert gpu_check.check_resumed(before, [*after[:9], after[8], *after[9:]], stdout)[0].startswith(
        "the metrics steps do not increase")
    no_updates = _rows(gpu_check.TOTAL, 1000)
    assert gpu_check.check_resumed(_rows(64, 1000, final=False), no_updates, stdout) == [
        "no update was logged before the kill", "no update was logged after the resume"]
    assert gpu_check.check_resumed(before, after[:-1], stdout) == ["no final evaluation was logged"]


@pytest.mark.skipif(os.name != "posix", reason="process groups")
def test_kill_group_tolerates_a_finished_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    gpu_check._kill_group(proc)
    assert proc.returncode == 0
