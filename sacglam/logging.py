"""Run metrics to a local JSONL file, to wandb (offline by default, never required) and to a console progress bar.

    logger = RunLogger("runs/x", LoggerConfig(), config_dict=cfg_dict, total_steps=100_000)
    logger.log(step, {"losses/critic": stats["losses/critic"], "charts/success": 0.4})  # floats or 0-d tensors
    logger.close()  # finishes wandb and writes runs/x/success.png

Tensors are converted to floats here and only here, so the training loop never syncs with the device for logging.
Each metrics line goes into the file whole or not at all (:class:`LineFile`), even when the disk fills.
Metric names follow CleanRL: ``charts/...``, ``losses/...``, ``eval/...``.

The options (:class:`LoggerConfig`) live in the light ``sacglam.config`` (the Hydra schema) and are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sacglam.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "success.png"
WANDB_ID_FILE = "wandb_run_id.txt"
WANDB_MODES = ("offline", "online", "disabled")

# Shown in the progress bar, first present key wins.
_BAR_SUCCESS_KEYS = ("charts/success", "eval/greedy/success")
_BAR_CRITIC_KEYS = ("losses/critic", "losses/qf_loss")
_BAR_ALPHA_KEYS = ("charts/alpha", "losses/alpha")


def _to_float(value: Any) -> float | None:
    """A metric as a JSON-safe float; non-finite values become None (JSON has no NaN/inf)."""
    f = float(value)
    return f if math.isfinite(f) else None


def _floats(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """Convert floats and 0-d tensors to floats with one device transfer per device (not one per metric)."""
    out: dict[str, float | None] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log 0-d tensors only")
            by_device.setdefault(value.device, []).append((key, value.detach().reshape(())))
        else:
            try:
                out[key] = _to_float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"metric {key!r} must be a float or a 0-d tensor, got {type(value).__name__}"
                ) from None
    for items in by_device.values():
        values = torch.stack([v.to(torch.float64) for _, v in items]).cpu().tolist()
        for (key, _), v in zip(items, values, strict=True):
            out[key] = _to_float(v)
    return {k: out[k] for k in metrics}  # keep the caller's order


def _truncate_jsonl(path: Path, max_step: int, max_lines: int | None = None) -> int:
    """Keep the lines of ``path`` with ``step <= max_step``, at most the first ``max_lines`` of them (and drop a torn
    last line); return how many were kept."""
    kept: list[str] = []
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}: dropping an unreadable line (a crash mid-write?): {line[:80]!r}", stacklevel=3)
                continue
            if int(record.get("step", -1)) <= max_step and (max_lines is None or len(kept) < max_lines):
                kept.append(json.dumps(record) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    try:
        tmp.write_text("".join(kept))
        os.replace(tmp, path)  # atomic: a crash here leaves either the old or the new file
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the old file is left whole, and no partial copy beside it
        raise
    return len(kept)


def read_metrics(metrics_path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file, in order; an unreadable line (torn by a crash or a full disk in a file
    written by older code) is skipped with a warning naming its line number."""
    records: list[dict[str, Any]] = []
    with Path(metrics_path).open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{metrics_path}:{number}: skipping an unreadable line (torn by a crash mid-write?): "
                              f"{line[:80]!r}", stacklevel=2)
    return records


class LineFile:
    """An append-only text file that holds whole lines only: each line goes in with ``os.write`` calls on an
    ``O_APPEND`` descriptor, and a write that fails (a full disk: ENOSPC, a quota, an I/O error) is cut back to the
    file's size before it, so no torn line is ever left behind; the error is raised naming the file and the free
    space. No buffering: a line is in the file (the OS's page cache) when :meth:`write_line` returns.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_line(self, line: str) -> None:
        """Append ``line`` (which ends with a newline) whole, or leave the file as it was and raise ``OSError``."""
        if self._fd is None:
            raise ValueError(f"LineFile {self.path} is closed")
        data = memoryview(line.encode())
        start = os.fstat(self._fd).st_size
        try:
            while data:  # os.write may write part of a large line without an error; write the rest
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)  # O_APPEND: the next line starts where this one would have
                cut = "the partial line was removed"
            except OSError as cut_exc:
                cut = f"removing the partial line failed too ({cut_exc}); readers skip it"
            try:
                free = f"{shutil.disk_usage(self.path.parent).free / 2**20:.1f} MiB free"
            except OSError:
                free = "free space unknown"
            raise OSError(exc.errno, f"could not append a line to {self.path}: {exc.strerror}; {free}; {cut}. "
                          "Free space and continue the run with resume=auto") from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), one output per input."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_success(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Plot success rates against env steps from a metrics JSONL file into a PNG (matplotlib, Agg canvas).

    Series: ``eval/greedy/success/<category>`` (one line each), ``eval/greedy/success`` (mean, bold) and the
    training success ``charts/success``, smoothed over 1% of its points (each point holds only the few episodes that
    ended at one vector step). A file with none of them gives an empty plot saying so.

    Returns:
        The path of the PNG.
    """
    # The Agg canvas is used directly so that plotting never changes the process's global matplotlib backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in r.items():
            is_success = key == "charts/success" or key == "eval/greedy/success"
            if (is_success or key.startswith("eval/greedy/success/")) and value is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(int(r["step"]))
                ys.append(float(value))
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in sorted(series):
        xs, ys = series[key]
        if key == "charts/success":
            window = max(1, len(ys) // 100)
            ax.plot(xs, moving_average(ys, window), label=f"train (charts/success, mean of {window})", color="0.5",
                    alpha=0.7)
        elif key == "eval/greedy/success":
            ax.plot(xs, ys, label="eval greedy, mean", color="black", linewidth=2.5, marker="o")
        else:
            ax.plot(xs, ys, label=f"eval greedy: {key.rsplit('/', 1)[-1]}", marker=".")
    if series:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no success metrics logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("env steps")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(Path(metrics_path).parent.name or "success")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


class RunLogger:
    """Metrics sink for one run: ``run_dir/metrics.jsonl``, wandb (lazily imported) and a tqdm progress bar.

    Resume: with ``resume_from_step=s``, an existing ``metrics.jsonl`` keeps only its lines with ``step <= s`` (and
    with ``keep_lines=n`` only the first ``n`` of them: the count ``lines`` had when the checkpoint was taken, which
    tells apart two lines of one step, such as the last training line and the final evaluation), so the file of a
    resumed run equals that of an uninterrupted one; the wandb run id saved in ``run_dir`` is reused. Without it, an
    existing file is replaced (with a warning).
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggerConfig,
        config_dict: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        *,
        resume_from_step: int | None = None,
        keep_lines: int | None = None,
    ) -> None:
        """Open the sinks: the JSONL file (truncated on resume), wandb (unless disabled) and the progress bar.

        Args:
            run_dir: the run's folder (created if missing).
            cfg: the logger options.
            config_dict: the run's full configuration, stored in wandb.
            total_steps: total env steps of the run, for the progress bar.
            resume_from_step: the env step of the checkpoint being resumed, or None for a fresh run.
            keep_lines: on resume, the number of lines the file had at the checkpoint (None: all up to the step).
        """
        mode = "disabled" if os.environ.get("WANDB_MODE") == "disabled" else cfg.wandb_mode
        if mode not in WANDB_MODES:
            raise ValueError(f"LoggerConfig.wandb_mode must be one of {WANDB_MODES}, got {mode!r}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.wandb_mode = mode
        self._last_log_step = resume_from_step if resume_from_step is not None else 0
        self._bar_step = self._last_log_step
        self._bar_time = time.perf_counter()
        self._postfix: dict[str, str] = {}
        self._closed = False

        self._file: LineFile | None = None
        self.lines = 0  # metrics lines in the file, this run's and the resumed ones (store it with a checkpoint)
        if cfg.jsonl:
            if resume_from_step is not None and self.metrics_path.exists():
                self.lines = _truncate_jsonl(self.metrics_path, resume_from_step, keep_lines)
            elif resume_from_step is None and self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
                warnings.warn(f"{self.metrics_path} exists and this is not a resume: starting it afresh", stacklevel=2)
                self.metrics_path.write_text("")
            self._file = LineFile(self.metrics_path)

        self._wandb: Any = None
        if mode != "disabled":
            self._wandb = self._init_wandb(config_dict, resume=resume_from_step is not None)

        self._bar: Any = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=self._bar_step, unit="step", dynamic_ncols=True)

    def _init_wandb(self, config_dict: Mapping[str, Any] | None, *, resume: bool) -> Any:
        """Start a wandb run; on any failure (wandb missing, no login for online mode, ...) warn and go on without."""
        try:
            import wandb

            id_path = self.run_dir / WANDB_ID_FILE
            run_id = id_path.read_text().strip() if resume and id_path.exists() else uuid.uuid4().hex[:8]
            id_path.write_text(run_id)
            return wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                name=self.cfg.run_name,
                group=self.cfg.group,
                config=dict(config_dict or {}),
                dir=str(self.run_dir),
                mode=self.wandb_mode,  # type: ignore[arg-type]
                id=run_id,
                resume="allow",
            )
        except Exception as err:  # wandb must never stop a run: its absence or failure only loses that sink
            warnings.warn(
                f"wandb.init(mode={self.wandb_mode!r}) failed, continuing without wandb: {err!r}. "
                f"Set logger.wandb_mode=disabled to silence this, or offline to log without an account.",
                stacklevel=3,
            )
            return None

    def should_log(self, step: int) -> bool:
        """True when ``step`` has moved at least ``cfg.log_every`` env steps past the last ``log`` call."""
        return step - self._last_log_step >= self.cfg.log_every

    def log(self, step: int, metrics: Mapping[str, float | torch.Tensor]) -> None:
        """Record ``metrics`` at env step ``step``: one JSON line, one wandb log, one progress-bar update.

        Args:
            step: env steps so far (the x axis of every plot).
            metrics: name -> float or 0-d tensor (on any device). Non-finite values are written as null.
        """
        if self._closed:
            raise RuntimeError("RunLogger.log called after close()")
        values = _floats(metrics)
        self._last_log_step = step
        if self._file is not None:
            # one whole line or none: a crash or a full disk never leaves a torn line (LineFile)
            self._file.write_line(json.dumps({"step": int(step), **values}) + "\n")
            self.lines += 1
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in values.items() if v is not None}, step=int(step))
            except Exception as err:
                warnings.warn(f"wandb.log failed, disabling wandb for this run: {err!r}", stacklevel=2)
                self._wandb = None
        if self._bar is not None:
            self._update_bar(step, values)

    def _update_bar(self, step: int, values: Mapping[str, float | None]) -> None:
        now = time.perf_counter()
        if step > self._bar_step:
            sps = (step - self._bar_step) / max(now - self._bar_time, 1e-9)
            self._postfix["sps"] = f"{sps:.0f}"
            self._bar.update(step - self._bar_step)
            self._bar_step, self._bar_time = step, now
        for label, keys in (("success", _BAR_SUCCESS_KEYS), ("critic", _BAR_CRITIC_KEYS), ("alpha", _BAR_ALPHA_KEYS)):
            for key in keys:
                if values.get(key) is not None:
                    self._postfix[label] = f"{values[key]:.3g}"
                    break
        self._bar.set_postfix(self._postfix, refresh=False)

    def close(self) -> Path | None:
        """Finish wandb, close the file and the bar, and plot ``run_dir/success.png`` (when JSONL is on).

        Returns:
            The plot's path, or None when no JSONL file is kept.
        """
        if self._closed:
            return None
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as err:
                warnings.warn(f"wandb.finish failed: {err!r}", stacklevel=2)
        if self._file is None:
            return None
        self._file.close()
        return plot_success(self.metrics_path, self.run_dir / PLOT_FILE)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
