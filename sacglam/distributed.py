"""Data-parallel runs: which process this is, per-rank seeds and folders, and the few collectives the loop needs.

``torchrun --nproc_per_node 2 train.py ...`` (CPU, gloo) or ``accelerate launch --multi_gpu --num_processes N
train.py ...`` (GPUs, nccl) start N processes; so does a submitit job of N tasks (SLURM,
``hydra/launcher=slurm_multigpu``), whose variables ``export_submitit_env`` turns into torchrun's. Each steps its own
envs (seeds ``rank_seed``), holds its own replay buffer shard and samples its share of the batch
(``sacglam.run.builders.rank_config``); the learner is given this process's :class:`Dist` when it is built
(``make_learner(..., dist=...)``) and its updater averages gradients, so the weights stay equal on every rank. One
process (rank 0) logs, evaluates and prints; every rank writes its own checkpoint shard (``sacglam.run.harness``) and
its own episode log (``sacglam.episode_log``: ``episodes/rank<k>/``, read back as one stream).

Accelerate's process state is used as it is, with one subtlety: on CPU it must be built with ``cpu=True``, or every
process believes it is alone (``num_processes == 1``) and steps the same seeds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RANKS_DIRNAME = "ranks"


@dataclass
class Dist:
    """This process's place in the run.

    Attributes:
        rank: 0 .. world - 1 (0 is the main process).
        world: number of processes.
    """

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (one collective; ``[obj]`` alone)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise mean of ``t`` over ranks, on every rank (one all-reduce; ``t`` itself alone)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def average_gradients(params: Sequence[torch.Tensor], reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace the gradient of every parameter that has one by its mean over the processes, in one collective.

    Every process runs the same code path, so the same parameters hold gradients everywhere; a NaN on one process
    becomes a NaN gradient on all of them, so they all raise together instead of deadlocking.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def init_distributed(device: torch.device) -> Dist:
    """The process state of a launched run (``WORLD_SIZE`` > 1 set by torchrun / accelerate, or by
    ``export_submitit_env`` in a submitit job of several tasks), else a single process.

    Builds accelerate's ``PartialState`` (``cpu=True`` on CPU), which initialises the process group; later
    ``Accelerator(cpu=...)`` objects share it.
    """
    export_submitit_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes <= 1:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate started a single process "
                           f"(backend {state.backend}); launch with torchrun or accelerate launch")
    return Dist(rank=state.process_index, world=state.num_processes)


def export_submitit_env() -> bool:
    """Inside a submitit job of several tasks (SLURM's ``tasks_per_node`` > 1, or the local executor's), set the
    variables torchrun would have set (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``) from the job's environment, so accelerate's state forms one run of all the tasks. Returns
    whether it did; nothing is touched outside submitit, in one-task jobs, or when a launcher already set ``RANK``.

    Every task must see all of its node's GPUs (``LOCAL_RANK`` picks one, as under torchrun): give the job
    ``gpus_per_node`` = ``tasks_per_node`` and no ``gpus_per_task`` (``conf/hydra/launcher/slurm_multigpu.yaml``).
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size <= 1:
        return False
    env.export(set_cuda_visible_devices=False)
    if torch.cuda.is_available() and env.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"submitit task {env.rank} is local rank {env.local_rank} but sees "
                           f"{torch.cuda.device_count()} GPU(s): give every task all of the node's GPUs "
                           "(gpus_per_node = tasks_per_node, no gpus_per_task)")
    return True


def rank_device(device: torch.device, dist: Dist) -> torch.device:
    """This process's device: ``cuda`` becomes the GPU accelerate made current for it (``cuda:<LOCAL_RANK>``), so
    every tensor and comparison names it; other devices are returned as they are.

    Raises:
        ValueError: a GPU index given (``device=cuda:0``) with several processes, which would put every rank on it.
    """
    if device.type != "cuda":
        return device
    if device.index is not None:
        if dist.world > 1:
            raise ValueError(f"device={device} with {dist.world} processes would put every rank on one GPU; use "
                             "device=auto (or cuda): each process takes the GPU of its LOCAL_RANK")
        return device
    return torch.device("cuda", torch.cuda.current_device())


def rank_seed(seed: int, rank: int) -> int:
    """The env and sampling seed of ``rank``: ``seed`` itself on rank 0 (a 1-process run is unchanged), far apart
    otherwise (episode seeds count up from it)."""
    return seed + 1_000_003 * rank


def rank_dir(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its checkpoints: the run folder itself for rank 0, ``ranks/rank<k>`` otherwise."""
    return run_dir if rank == 0 else run_dir / RANKS_DIRNAME / f"rank{rank}"


def check_data_parallel(cfg: Any, dist: Dist) -> None:
    """Refuse what the data-parallel loop does not do yet, naming the option (nothing to check for one process)."""
    if dist.world == 1:
        return
    from sacglam.algos.ppo.config import PPOConfig
    from sacglam.algos.sac.config import SACConfig
    from sacglam.validate import ConfigError

    if not isinstance(cfg.algo, (SACConfig, PPOConfig)):
        raise ValueError(f"{dist.world} processes: data-parallel training runs algo=sac and algo=ppo (got algo="
                         f"{cfg.algo.name}): ETO's rounds are not split across processes (every rank would play the "
                         "same training tasks, and its SFT and DPO steps do not average gradients, so the ranks' "
                         "weights would drift apart; the README's data-parallel paragraph says what it would take); "
                         "run ETO with one process")
    if isinstance(cfg.algo, PPOConfig):
        share = dist.world * cfg.algo.grad_accum
        if cfg.algo.minibatch_size % share:
            raise ConfigError(f"algo.minibatch_size={cfg.algo.minibatch_size} must divide by the {dist.world} "
                              f"processes x algo.grad_accum={cfg.algo.grad_accum} (each takes its share of every "
                              "minibatch)")
    elif cfg.batch_size % (dist.world * cfg.algo.grad_accum):
        raise ConfigError(f"batch_size={cfg.batch_size} must divide by the {dist.world} processes x algo.grad_accum="
                          f"{cfg.algo.grad_accum} (each samples its share of the global batch, in equal "
                          "micro-batches)")


def resolve_rank_resume(resume: str, run_dir: Path, dist: Dist) -> Path | None:
    """This rank's checkpoint to resume from: ``never`` -> None; ``auto`` -> the newest step all ranks hold (None
    when there is none); an explicit path is not supported with several processes."""
    from sacglam.checkpoint import checkpoint_path, checkpoint_step, list_checkpoints

    if resume == "never":
        return None
    if resume != "auto":
        raise ValueError(f"resume={resume!r}: with {dist.world} processes use resume=auto (each rank reads its own "
                         "shard from the run folder)")
    mine = [s for p in list_checkpoints(rank_dir(run_dir, dist.rank)) if (s := checkpoint_step(p)) is not None]
    step = common_step(dist.gather(mine))
    return None if step is None else checkpoint_path(rank_dir(run_dir, dist.rank), step)


def common_step(steps_by_rank: Sequence[Sequence[int]]) -> int | None:
    """The newest checkpoint step every rank holds (ranks save one after another, so a crash can leave rank 0 one
    checkpoint ahead); None when they share none."""
    common = set(steps_by_rank[0]).intersection(*map(set, steps_by_rank[1:])) if steps_by_rank else set()
    return max(common) if common else None


__all__ = ["RANKS_DIRNAME", "Dist", "average_gradients", "check_data_parallel", "common_step", "export_submitit_env",
           "init_distributed", "rank_device", "rank_dir", "rank_seed", "resolve_rank_resume"]
