"""What every training run does whatever its algorithm: the :class:`RunContext`.

``train.py`` makes one per run (:meth:`RunContext.start`) and drives SAC and PPO through it in its step loop;
``sacglam.algos.eto.run.run_eto`` drives ETO's rounds through the same one. It owns:

* the process: the typed config, the run folder, the device, the data-parallel place (:class:`Dist`) and the refusal
  of what the data-parallel loop does not do (``check_data_parallel``);
* resume: which checkpoint to continue (``resume=auto``: the newest complete one of the run folder; with several
  processes, the newest step every rank holds), loaded and checked against this run's algorithm and process count;
* the logs: the metrics ``RunLogger`` (main process only; on resume the metrics file is cut back to the checkpoint's
  lines) and the episode log;
* checkpoints: a state assembled from the algorithm's parts plus the run's own keys, saved atomically into this rank's
  folder, then a barrier so that every shard is on disk before any rank goes on;
* the time limit (``time_limit_min``, from :meth:`start_clock`), agreed by all ranks so that they stop together;
* the evaluation (main process only) and the closing: the final metrics row, the logs closed, the final greedy
  success printed and returned.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sacglam.checkpoint import (
    CheckpointWriteError,
    check_run_state,
    find_latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from sacglam.config import ALGOS, TrainConfig
from sacglam.distributed import (
    Dist,
    check_data_parallel,
    init_distributed,
    rank_device,
    rank_dir,
    resolve_rank_resume,
)
from sacglam.episode_log import EpisodeLog
from sacglam.episodes import EpisodeRecord
from sacglam.logging import RunLogger
from sacglam.run.builders import resolve_device

Evaluator = Callable[[], dict[str, float]]
"""The run's evaluation (``sacglam.run.builders.make_evaluator``): metrics by name."""


@dataclass
class RunContext:
    """One process of one run: its configuration, folder, device and data-parallel place, and the services every
    algorithm's loop uses (resume, logs, checkpoints, time limit, evaluation, closing).

    Attributes:
        cfg: the typed configuration.
        config_dict: the resolved configuration as plain containers (stored with the wandb run).
        run_dir: the run folder (Hydra's output folder).
        device: this process's device.
        dist: this process's place in the run.
        overrides: the command line's ``key=value`` overrides (Hydra's ``overrides.task``).
        evaluator: the run's evaluation, set by the algorithm once its agent is built.
        logger: the metrics logger (None on ranks other than 0 and before :meth:`open_logs`).
        episode_log: the episode log (None unless ``logger.episodes``).
        resumed_from: the checkpoint this run continues (None for a fresh run).
    """

    cfg: TrainConfig
    config_dict: dict[str, Any]
    run_dir: Path
    device: torch.device
    dist: Dist = field(default_factory=Dist)
    overrides: list[str] = field(default_factory=list)
    evaluator: Evaluator | None = None
    logger: RunLogger | None = None
    episode_log: EpisodeLog | None = None
    resumed_from: Path | None = None
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, dcfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> RunContext:
        """The context of this process of a run composed by Hydra: the algorithm checked, the device resolved
        (``threads`` applied), the process group joined when launched with several processes, and the options the
        data-parallel loop does not support refused.

        Args:
            dcfg: the composed configuration.
            run_dir: the run folder (``train.py`` passes Hydra's output folder).
            overrides: the command line's ``key=value`` overrides (Hydra's ``overrides.task``).

        Raises:
            ValueError: ``algo`` is none of the ``conf/algo`` presets, or an option that several processes refuse.
        """
        cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        if not isinstance(cfg.algo, tuple(ALGOS.values())):
            raise ValueError(f"algo must be one of the conf/algo presets ({', '.join(ALGOS)}); got {cfg.algo!r}")
        device = resolve_device(cfg)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        dist = init_distributed(device)  # one process, or this rank of a torchrun / accelerate / submitit launch
        device = rank_device(device, dist)
        check_data_parallel(cfg, dist)
        config_dict = OmegaConf.to_container(dcfg, resolve=True)
        assert isinstance(config_dict, dict)
        return cls(cfg, config_dict, Path(run_dir), device, dist,  # type: ignore[arg-type]
                   overrides=list(overrides))

    # ------------------------------------------------------------------------------------------------------ resume
    def resume_path(self) -> Path | None:
        """The checkpoint ``resume`` names: the newest complete one of the run folder for ``auto`` (a corrupt one is
        skipped with a warning); with several processes, this rank's shard of the newest step every rank holds."""
        if self.dist.world > 1:
            return resolve_rank_resume(self.cfg.resume, self.run_dir, self.dist)
        return resolve_resume(self.cfg.resume, self.run_dir)

    def load_resume(self) -> dict[str, Any] | None:
        """The state to continue from (None for a fresh run), checked to be of this algorithm and process count.

        Raises:
            ValueError: the checkpoint was written by another algorithm or another number of processes.
        """
        path = self.resume_path()
        if path is None:
            return None
        state = load_checkpoint(path, map_location=self.device, weights_only=False)  # our own file
        check_run_state(state, path, self.cfg.algo.name, self.dist.world)
        self.resumed_from = path
        return state

    # -------------------------------------------------------------------------------------------------------- logs
    def open_logs(self, state: Mapping[str, Any] | None, log_step: int, episode_step: int) -> None:
        """Open the metrics logger (rank 0) and the episode log (``logger.episodes``).

        Args:
            state: the resumed checkpoint (None for a fresh run): the metrics file keeps its lines up to
                ``log_step`` (and, when the checkpoint counted them, only its first ``metrics_lines``), the episode
                log its episodes up to ``episode_step``.
            log_step: the env step of the resumed state's last metrics line (or of the state itself).
            episode_step: the run's env step of the resumed state (over all ranks, as ``EpisodeRecord.env_step``).
        """
        cfg, resumed = self.cfg, state is not None
        if self.dist.is_main:
            self.logger = RunLogger(self.run_dir, cfg.logger, self.config_dict, cfg.total_env_steps,
                                    resume_from_step=log_step if resumed else None,
                                    keep_lines=state.get("metrics_lines") if state is not None else None)
        if cfg.logger.episodes:  # every rank its own files (sacglam.episode_log)
            self.episode_log = EpisodeLog(self.run_dir, cfg.logger.episodes_max_mb,
                                          episode_step if resumed else None, rank=self.dist.rank,
                                          world=self.dist.world)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One metrics row at env step ``step`` (rank 0; nothing elsewhere)."""
        if self.logger is not None:
            self.logger.log(step, metrics)

    def write_episodes(self, records: Sequence[EpisodeRecord]) -> None:
        """Append finished episodes to the episode log (when it is on)."""
        if self.episode_log is not None and records:
            self.episode_log.write(records)

    # ------------------------------------------------------------------------------------------------- checkpoints
    def save(self, step: int, parts: Mapping[str, Any]) -> Path | None:
        """Save this rank's checkpoint of env step ``step``: ``{"algo", **parts, "world", "metrics_lines"}``
        (atomically, keeping the newest ``checkpoint.keep``), then wait until every rank has saved its own.

        A save that fails on any rank (a full disk: ``CheckpointWriteError``) leaves the earlier checkpoints intact;
        every rank then stops with that error (``checkpoint.on_error=stop``) or warns and goes on (``continue``).

        Args:
            step: the run's env step (the checkpoint's name).
            parts: the algorithm's state (agent, learner, RNG, loop counters, ...), by key.

        Returns:
            This rank's checkpoint, or None when a rank's save failed and ``checkpoint.on_error=continue``.

        Raises:
            CheckpointWriteError: a rank's save failed and ``checkpoint.on_error=stop`` (the message names the file
                and the free space).
        """
        state = {"algo": self.cfg.algo.name, **parts, "world": self.dist.world,
                 "metrics_lines": self.logger.lines if self.logger is not None else None}
        path: Path | None = None
        error: CheckpointWriteError | None = None
        try:
            path = save_checkpoint(rank_dir(self.run_dir, self.dist.rank), step, state, keep=self.cfg.checkpoint.keep)
        except CheckpointWriteError as exc:
            error = exc
        # One collective in place of a barrier: every rank's shard is on disk (or failed) before any goes on, and all
        # ranks learn of a failure so that they stop, or go on, together.
        failures = [f"rank {rank}: {msg}" for rank, msg in enumerate(self.dist.gather(error and str(error))) if msg]
        if not failures:
            return path
        if self.cfg.checkpoint.on_error == "stop":
            if error is not None:
                raise error
            raise CheckpointWriteError("; ".join(failures), rank_dir(self.run_dir, self.dist.rank), None, False)
        warnings.warn(f"checkpoint of env step {step} failed, training goes on (checkpoint.on_error=continue): "
                      f"{'; '.join(failures)}", stacklevel=2)
        return None

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of the run folder (rank 0's), for messages."""
        return find_latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------------------------------------ time limit
    def start_clock(self) -> None:
        """Start the run's clock: ``time_limit_min`` and ``perf/minutes`` count from here."""
        self.started = time.monotonic()

    def minutes(self) -> float:
        """Minutes since :meth:`start_clock` (this process's wall clock)."""
        return (time.monotonic() - self.started) / 60

    def time_up(self) -> bool:
        """This process's verdict: ``time_limit_min`` (> 0) is spent. Share it with the other ranks (or use
        :meth:`time_up_everywhere`) so that all stop at the same step."""
        return bool(self.cfg.time_limit_min and self.minutes() > self.cfg.time_limit_min)

    def time_up_everywhere(self) -> bool:
        """Whether any rank's time limit is spent (one collective with several processes)."""
        return any(self.dist.gather(self.time_up()))

    def announce_time_limit(self, step: int) -> None:
        print_main(self.dist, f"time limit of {self.cfg.time_limit_min} min reached at env step {step}")

    # ------------------------------------------------------------------------------------------- evaluate, close
    def evaluate(self) -> dict[str, float]:
        """The run's evaluation on rank 0 ({} on the other ranks, which wait at the next collective)."""
        if not self.dist.is_main:
            return {}
        assert self.evaluator is not None, "RunContext.evaluator is set once the agent is built"
        return self.evaluator()

    def close(self, final: Mapping[str, float], summary: str) -> float:
        """Close the logs; on rank 0 print the final greedy success of ``final`` with ``summary`` (e.g. ``"after N
        env steps and U updates"``) and the run folder.

        Returns:
            ``final["eval/greedy/success"]`` (0.0 when absent, and on the other ranks).
        """
        if self.episode_log is not None:
            self.episode_log.close()
        if self.logger is None:
            return 0.0
        self.logger.close()
        success = float(final.get("eval/greedy/success", 0.0))
        print(f"final greedy success {success:.3f} {summary}; run folder {self.run_dir}")
        return success


def print_main(dist: Dist, message: str) -> None:
    """Print ``message`` on rank 0 only."""
    if dist.is_main:
        print(message)


__all__ = ["Evaluator", "RunContext", "print_main"]
