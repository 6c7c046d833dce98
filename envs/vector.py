"""Step a batch of text environments at once, with auto-reset: one synchronous and one subprocess implementation.

Both classes share one interface and give identical results for the same seeds and actions::

    venv = make_vector_env("sacglam/PlaygroundText-v0", 8, mode="subprocess")
    obs, infos = venv.reset(seed=0)                      # env i is seeded with 0 + i
    out = venv.step([rng.choice(i["admissible_actions"]) for i in infos])
    # out.observations[i] / out.infos[i] belong to the *new* episode when env i finished (auto-reset);
    # out.infos[i]["final_observation"] / ["final_info"] hold the finished episode's last observation and info.
    venv.close()

Auto-reset calls ``env.reset()`` with no seed and no options: the env's own RNG continues from the seed it was last
reset with, so a run is a deterministic function of the seed and the actions, and the goal distribution is the one
set by the env's constructor kwargs. Options given to ``reset(options=...)`` apply to that reset only.

Any exception raised by an env (in a worker process or not) surfaces as an ``EnvWorkerError`` naming the env index,
the env id, the seed of its last explicit reset, the episode and step since then, and the original traceback. A
worker process that dies or stops answering also raises ``EnvWorkerError`` (never a hang) and closes the vector env.
After an env error in ``step`` or ``reset`` the batch is inconsistent (some envs stepped), so the next call must be
``reset(seed=...)``; ``step`` before it raises a RuntimeError saying so.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Self

import gymnasium as gym
import numpy as np

EnvFn = Callable[[], gym.Env[str, str]]  # e.g. a TextEnvBase subclass or functools.partial(gym.make, id)

_MODES = ("sync", "subprocess")


@dataclass
class VectorStepResult:
    """The outcome of one vector step over N environments.

    Attributes:
        observations: N observation strings; for an env whose episode just ended, the auto-reset episode's first one.
        rewards: [N] float32 rewards of the step.
        terminated: [N] bool, the episode reached a terminal state (goal achieved, game won or lost).
        truncated: [N] bool, the episode hit its step limit without terminating.
        infos: N info dicts; for an env whose episode just ended, the new episode's reset info plus
            ``"final_observation"`` (str) and ``"final_info"`` (dict): the finished episode's last observation/info.
    """

    observations: list[str]
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: list[dict[str, Any]]


class EnvWorkerError(RuntimeError):
    """An environment in a vector env raised, or its worker process died or stopped answering.

    Attributes:
        index: position of the env in the vector env.
        env_id: the env's registered id (or class name when it has no spec).
        seed: the seed of the env's last explicit ``reset(seed=...)`` (None when never seeded).
        episode: episodes started since that reset (0 = the seeded one; auto-resets continue the seeded RNG).
        step: steps taken in the current episode before the failing call.
        command: what the vector env was doing (``"reset"``, ``"step('Go to cow')"``, ``"call('goal_space')"``, ...).
        exc_type: the original exception's class name (``"WorkerDied"`` / ``"Timeout"`` for a lost worker).
        worker_traceback: the original traceback text (empty for a lost worker).
    """

    def __init__(
        self,
        *,
        index: int,
        env_id: str,
        seed: int | None,
        episode: int,
        step: int,
        command: str,
        exc_type: str,
        message: str,
        worker_traceback: str = "",
    ) -> None:
        self.index = index
        self.env_id = env_id
        self.seed = seed
        self.episode = episode
        self.step = step
        self.command = command
        self.exc_type = exc_type
        self.worker_traceback = worker_traceback
        text = (
            f"env {index} ({env_id}, seed={seed}, episode {episode} since that seed, step {step}) failed in "
            f"{command}: {exc_type}: {message}"
        )
        if worker_traceback:
            text += f"\n--- original traceback (env {index}) ---\n{worker_traceback.rstrip()}"
        super().__init__(text)


def _env_id(env: gym.Env[Any, Any]) -> str:
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


def _get_attr(env: gym.Env[Any, Any], name: str) -> Any:
    # gymnasium>=1.0 wrappers no longer forward unknown attributes; get_wrapper_attr walks the wrapper chain.
    getter = getattr(env, "get_wrapper_attr", None)
    return getter(name) if getter is not None else getattr(env, name)


def _call(env: gym.Env[Any, Any], name: str, args: tuple[Any, ...]) -> Any:
    attr = _get_attr(env, name)
    return attr(*args) if callable(attr) else attr


def _step_autoreset(env: gym.Env[str, str], action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
    """Step one env; when its episode ends, reset it (no seed, no options) and attach the final observation/info."""
    obs, reward, terminated, truncated, info = env.step(action)
    if terminated or truncated:
        final_obs, final_info = obs, info
        obs, info = env.reset()
        info = dict(info)  # never mutate the env's own dict
        info["final_observation"] = final_obs
        info["final_info"] = final_info
    return obs, float(reward), bool(terminated), bool(truncated), info


def _dump_env(env: gym.Env[Any, Any]) -> bytes:
    """Pickle an env mid-episode (RNG and all), for exact checkpoints; a clear error when it cannot be pickled."""
    try:
        return pickle.dumps(env)
    except Exception as exc:  # e.g. TextWorld holds a live interpreter process
        raise TypeError(
            f"env {_env_id(env)} cannot be saved mid-episode ({type(exc).__name__}: {exc}); "
            "checkpoints of this env restart its episodes on resume"
        ) from exc


def _fn_name(fn: EnvFn) -> str:
    """A readable name for an env constructor, until the env itself can say its id."""
    if isinstance(fn, functools.partial) and fn.func is _make_env:
        return str(fn.args[0])
    return str(getattr(fn, "__qualname__", repr(fn)))


def _describe(command: str, payload: Any) -> str:
    if command == "step":
        return f"step({payload!r})"
    if command == "call":
        return f"call({payload[0]!r})"
    return command


class _VectorBase:
    """Bookkeeping shared by both implementations: argument checks, seeds/episodes/steps per env, result packing."""

    num_envs: int
    env_ids: list[str]

    def _init_tracking(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self._seeds: list[int | None] = [None] * num_envs
        self._episodes = [0] * num_envs
        self._steps = [0] * num_envs
        self._needs_reset = True
        self.closed = False

    def _tracking_state(self) -> dict[str, Any]:
        return {"seeds": list(self._seeds), "episodes": list(self._episodes), "steps": list(self._steps),
                "needs_reset": self._needs_reset}

    def _load_tracking_state(self, state: dict[str, Any]) -> None:
        if len(state["seeds"]) != self.num_envs:
            raise ValueError(f"saved vector-env state holds {len(state['seeds'])} envs, this one has {self.num_envs}")
        self._seeds, self._episodes, self._steps = list(state["seeds"]), list(state["episodes"]), list(state["steps"])
        self._needs_reset = bool(state["needs_reset"])

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed; build a new one (make_vector_env) to keep stepping")

    def _reset_payloads(
        self, seed: int | None, options: Sequence[dict[str, Any] | None] | None
    ) -> list[tuple[int | None, dict[str, Any] | None]]:
        self._check_open()
        if options is None:
            options = [None] * self.num_envs
        elif isinstance(options, dict) or len(options) != self.num_envs:
            raise ValueError(
                f"reset(options=...) takes one dict (or None) per env, a sequence of length {self.num_envs}; "
                f"got {type(options).__name__} of length {len(options)}. Use [opts] * num_envs to repeat one."
            )
        seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        return list(zip(seeds, options, strict=True))

    def _after_reset(self, seeds: Sequence[int | None]) -> None:
        for i, s in enumerate(seeds):
            if s is not None:
                self._seeds[i] = s
                self._episodes[i] = 0
            else:
                self._episodes[i] += 1
            self._steps[i] = 0
        self._needs_reset = False

    def _check_actions(self, actions: Sequence[str]) -> None:
        self._check_open()
        if self._needs_reset:
            raise RuntimeError(
                f"{type(self).__name__}.step() called before reset() (or after an env error left the batch "
                "inconsistent); call reset(seed=...) first"
            )
        if isinstance(actions, str) or len(actions) != self.num_envs:
            raise ValueError(
                f"step() takes one action string per env, a sequence of length {self.num_envs}; got {actions!r}"
            )

    def _pack(self, results: Sequence[tuple[str, float, bool, bool, dict[str, Any]]]) -> VectorStepResult:
        for i, (_, _, term, trunc, _) in enumerate(results):
            if term or trunc:
                self._episodes[i] += 1
                self._steps[i] = 0
            else:
                self._steps[i] += 1
        return VectorStepResult(
            observations=[r[0] for r in results],
            rewards=np.array([r[1] for r in results], dtype=np.float32),
            terminated=np.array([r[2] for r in results], dtype=bool),
            truncated=np.array([r[3] for r in results], dtype=bool),
            infos=[r[4] for r in results],
        )

    def _error(self, i: int, command: str, exc_type: str, message: str, tb: str = "") -> EnvWorkerError:
        return EnvWorkerError(
            index=i,
            env_id=self.env_ids[i],
            seed=self._seeds[i],
            episode=self._episodes[i],
            step=self._steps[i],
            command=command,
            exc_type=exc_type,
            message=message,
            worker_traceback=tb,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class SyncVectorTextEnv(_VectorBase):
    """N text envs stepped one after the other in this process (for tests, debugging and cheap envs).

    Args:
        env_fns: one zero-argument constructor per env (e.g. ``functools.partial(gymnasium.make, env_id)``).
    """

    def __init__(self, env_fns: Sequence[EnvFn]) -> None:
        if len(env_fns) == 0:
            raise ValueError("SyncVectorTextEnv needs at least one env constructor in env_fns")
        self._init_tracking(len(env_fns))
        self.envs: list[gym.Env[str, str]] = []
        self.env_ids = []
        for i, fn in enumerate(env_fns):
            try:
                env = fn()
            except Exception as exc:
                self.close()
                raise EnvWorkerError(
                    index=i,
                    env_id=_fn_name(fn),
                    seed=None,
                    episode=0,
                    step=0,
                    command="make",
                    exc_type=type(exc).__name__,
                    message=str(exc),
                    worker_traceback=traceback.format_exc(),
                ) from exc
            self.envs.append(env)
            self.env_ids.append(_env_id(env))

    def reset(
        self, *, seed: int | None = None, options: Sequence[dict[str, Any] | None] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Reset every env; env i gets ``seed + i`` (when seed is given) and ``options[i]``.

        Returns:
            (observations, infos): N observation strings and N info dicts.
        """
        payloads = self._reset_payloads(seed, options)
        self._after_reset([p[0] for p in payloads])  # first, so that an error names the seed being applied
        results = []
        for i, (env, (s, opts)) in enumerate(zip(self.envs, payloads, strict=True)):
            try:
                results.append(env.reset(seed=s, options=opts))
            except Exception as exc:
                self._needs_reset = True
                raise self._error(i, "reset", type(exc).__name__, str(exc), traceback.format_exc()) from exc
        return [r[0] for r in results], [r[1] for r in results]

    def step(self, actions: Sequence[str]) -> VectorStepResult:
        """Step env i with ``actions[i]``; finished envs are auto-reset (see the module docstring)."""
        self._check_actions(actions)
        results = []
        for i, (env, action) in enumerate(zip(self.envs, actions, strict=True)):
            try:
                results.append(_step_autoreset(env, action))
            except Exception as exc:
                # Envs before i have stepped and the others have not: only a reset makes the batch consistent again.
                self._needs_reset = True
                raise self._error(
                    i, _describe("step", action), type(exc).__name__, str(exc), traceback.format_exc()
                ) from exc
        return self._pack(results)

    def call(self, name: str, *args: Any) -> list[Any]:
        """Call method ``name(*args)`` on every env (or read attribute ``name`` when it is not callable)."""
        self._check_open()
        out = []
        for i, env in enumerate(self.envs):
            try:
                out.append(_call(env, name, args))
            except Exception as exc:
                raise self._error(
                    i, _describe("call", (name,)), type(exc).__name__, str(exc), traceback.format_exc()
                ) from exc
        return out

    def get_state(self) -> dict[str, Any]:
        """Every env pickled mid-episode plus the bookkeeping, so that a resumed run continues exactly.

        Raises:
            TypeError: an env cannot be pickled (e.g. TextWorld); the caller falls back to fresh episodes.
        """
        self._check_open()
        return {"tracking": self._tracking_state(), "envs": [_dump_env(env) for env in self.envs]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Replace the envs by the pickled ones of ``get_state`` (same number of envs)."""
        self._check_open()
        self._load_tracking_state(state["tracking"])
        for env in self.envs:
            env.close()
        self.envs = [pickle.loads(blob) for blob in state["envs"]]

    def close(self) -> None:
        """Close every env. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for env in self.envs:
            env.close()


# ------------------------------------------------------------------------------------------------- subprocess


def _worker(remote: Connection, parent_remote: Connection, env_fn: EnvFn) -> None:
    """Worker loop: build the env, then answer (command, payload) messages with ("ok", result) / ("error", ...)."""
    # Ctrl-C goes to the whole process group; the parent handles it and closes us, so the worker must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_remote.close()
    try:
        env = env_fn()
        remote.send(("ok", _env_id(env)))
    except Exception as exc:
        remote.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
        remote.close()
        return
    try:
        while True:
            command, payload = remote.recv()
            if command == "close":
                env.close()
                remote.send(("ok", None))
                break
            try:
                if command == "step":
                    result: Any = _step_autoreset(env, payload)
                elif command == "reset":
                    result = env.reset(seed=payload[0], options=payload[1])
                elif command == "call":
                    result = _call(env, payload[0], payload[1])
                elif command == "get_state":
                    result = _dump_env(env)
                elif command == "set_state":
                    env.close()
                    env = pickle.loads(payload)
                    result = None
                else:
                    raise ValueError(f"unknown worker command {command!r}")
                remote.send(("ok", result))
            except Exception as exc:
                remote.send(("error", (type(exc).__name__, str(exc), traceback.format_exc())))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the parent went away; nothing left to answer
    finally:
        remote.close()


def _default_context() -> str:
    # forkserver starts workers from a clean, small server process (no copied torch/CUDA state, fast to spawn);
    # spawn is the portable fallback (macOS/Windows have no forkserver).
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class SubprocVectorTextEnv(_VectorBase):
    """N text envs, one worker process each, stepped in parallel over pipes (same interface as the sync one).

    Every call sends one message to every worker and then collects all answers, so the pipes stay in step even when
    one env raises (its ``EnvWorkerError`` is raised after all answers are in, and a reset makes the vector env usable
    again). A
    worker that dies or does not answer within ``timeout`` seconds raises ``EnvWorkerError`` and closes the vector
    env (its other workers' answers could no longer be matched to requests).

    Args:
        env_fns: one picklable zero-argument constructor per env (module-level functions or ``functools.partial``
            of them; lambdas and closures cannot be sent to a forkserver/spawn worker).
        context: multiprocessing start method, ``"forkserver"`` (default where available) or ``"spawn"``;
            ``"fork"`` works but is unsafe once torch threads or CUDA exist in the parent.
        timeout: seconds to wait for any one answer (env construction included) before declaring the worker hung;
            None waits forever (still failing fast when the worker dies).
    """

    def __init__(self, env_fns: Sequence[EnvFn], *, context: str | None = None, timeout: float | None = 120.0) -> None:
        if len(env_fns) == 0:
            raise ValueError("SubprocVectorTextEnv needs at least one env constructor in env_fns")
        self._init_tracking(len(env_fns))
        self.timeout = timeout
        self.env_ids = [_fn_name(fn) for fn in env_fns]  # replaced by the real ids once the workers answer
        # typeshed types get_context(str) as BaseContext, which lacks Process/Pipe; the concrete contexts have them.
        ctx: Any = mp.get_context(context or _default_context())
        self._remotes: list[Connection] = []
        self._processes: list[BaseProcess] = []
        for i, fn in enumerate(env_fns):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_worker, args=(child, parent, fn), daemon=True)
            try:
                proc.start()  # pickles fn for the new process
            except Exception as exc:
                parent.close()
                child.close()
                self.close()
                raise TypeError(
                    f"env_fns[{i}] ({_fn_name(fn)}) cannot be sent to a worker process: {type(exc).__name__}: {exc}. "
                    "Use a module-level function or functools.partial of one, not a lambda or closure."
                ) from exc
            child.close()
            self._remotes.append(parent)
            self._processes.append(proc)
        ids = self._gather("make", [None] * self.num_envs)
        self.env_ids = [str(i) for i in ids]

    def _recv(self, i: int, command: str) -> tuple[str, Any]:
        """One answer from worker i; a dead or silent worker closes the vector env and raises EnvWorkerError."""
        remote, proc = self._remotes[i], self._processes[i]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            # Poll in short slices so a dead worker is noticed at once instead of after the full timeout.
            while not remote.poll(0.05):
                if not proc.is_alive():
                    # It may have answered just before exiting.
                    if remote.poll(0):
                        break
                    raise self._lost(i, command, "WorkerDied", f"worker process exited with code {proc.exitcode}")
                if deadline is not None and time.monotonic() > deadline:
                    raise self._lost(i, command, "Timeout", f"no answer within timeout={self.timeout} s")
            status, payload = remote.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError, OSError) as exc:
            proc.join(timeout=2.0)  # the pipe closes as the process exits; wait a moment for its exit code
            raise self._lost(i, command, "WorkerDied", f"pipe broke ({type(exc).__name__}): worker process exited "
                             f"with code {proc.exitcode}") from exc  # fmt: skip
        return status, payload

    def _lost(self, i: int, command: str, kind: str, message: str) -> EnvWorkerError:
        message += "; the vector env is closed, build a new one"
        if command == "make" and kind == "WorkerDied":
            # The usual cause: a forkserver/spawn worker re-imports the main script, which starts workers again.
            message += (
                ". A worker that dies while starting usually means the main script creates the vector env at import "
                'time: put that code under `if __name__ == "__main__":` (see the worker\'s traceback above)'
            )
        err = self._error(i, command, kind, message)
        if self._processes[i].is_alive():
            self._processes[i].terminate()  # a hung worker would not read the close message
        self.close()
        return err

    def _gather(self, command: str, payloads: Sequence[Any]) -> list[Any]:
        """Send ``(command, payloads[i])`` to every worker, collect every answer, then raise the first env error."""
        self._check_open()
        if command != "make":
            for i, (remote, payload) in enumerate(zip(self._remotes, payloads, strict=True)):
                try:
                    remote.send((command, payload))
                except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                    raise self._lost(i, _describe(command, payload), "WorkerDied",
                                     f"cannot send ({type(exc).__name__})") from exc  # fmt: skip
        results: list[Any] = []
        first_error: EnvWorkerError | None = None
        for i, payload in enumerate(payloads):
            status, value = self._recv(i, _describe(command, payload))
            if status == "error" and first_error is None:
                exc_type, message, tb = value
                first_error = self._error(i, _describe(command, payload), exc_type, message, tb)
            results.append(value)
        if first_error is not None:
            if command == "make":
                self.close()
            raise first_error
        return results

    def reset(
        self, *, seed: int | None = None, options: Sequence[dict[str, Any] | None] | None = None
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Reset every env; env i gets ``seed + i`` (when seed is given) and ``options[i]``.

        Returns:
            (observations, infos): N observation strings and N info dicts.
        """
        payloads = self._reset_payloads(seed, options)
        self._after_reset([p[0] for p in payloads])  # first, so that an error names the seed being applied
        try:
            results = self._gather("reset", payloads)
        except EnvWorkerError:
            self._needs_reset = True
            raise
        return [r[0] for r in results], [r[1] for r in results]

    def step(self, actions: Sequence[str]) -> VectorStepResult:
        """Step env i with ``actions[i]`` in parallel; finished envs are auto-reset (see the module docstring)."""
        self._check_actions(actions)
        try:
            results = self._gather("step", list(actions))
        except EnvWorkerError:
            # The other envs have stepped but their results are dropped: only a reset makes the batch consistent.
            self._needs_reset = True
            raise
        return self._pack(results)

    def call(self, name: str, *args: Any) -> list[Any]:
        """Call method ``name(*args)`` on every env (or read attribute ``name``); results must be picklable."""
        return self._gather("call", [(name, args)] * self.num_envs)

    def get_state(self) -> dict[str, Any]:
        """Every worker's env pickled mid-episode plus the bookkeeping (see ``SyncVectorTextEnv.get_state``)."""
        try:
            blobs = self._gather("get_state", [None] * self.num_envs)
        except EnvWorkerError as exc:
            raise TypeError(str(exc)) from exc
        return {"tracking": self._tracking_state(), "envs": blobs}

    def set_state(self, state: dict[str, Any]) -> None:
        """Load the pickled envs of ``get_state`` into the workers."""
        self._load_tracking_state(state["tracking"])
        self._gather("set_state", list(state["envs"]))

    def close(self) -> None:
        """Ask every worker to close its env, then end the processes (terminate those that do not exit). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for remote, proc in zip(self._remotes, self._processes, strict=False):
            if proc.is_alive():
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                    remote.send(("close", None))
        for remote, proc in zip(self._remotes, self._processes, strict=False):
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            remote.close()

    def __del__(self) -> None:
        # Best effort at interpreter exit or garbage collection; daemon workers die with the parent anyway.
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.close()


def _make_env(env_id: str, env_kwargs: dict[str, Any]) -> gym.Env[str, str]:
    """Build one registered env. Module-level so that ``functools.partial`` of it pickles into worker processes.

    Importing this module imports the ``envs`` package, which registers the ``sacglam/`` ids in the worker too.
    """
    return gym.make(env_id, **env_kwargs)


def make_vector_env(
    env_id: str,
    num_envs: int,
    *,
    env_kwargs: dict[str, Any] | None = None,
    mode: str = "sync",
    context: str | None = None,
    timeout: float | None = 120.0,
) -> SyncVectorTextEnv | SubprocVectorTextEnv:
    """Build ``num_envs`` copies of a registered text env (``gymnasium.make(env_id, **env_kwargs)``) as one vector env.

    Args:
        env_id: a registered id, e.g. ``"sacglam/PlaygroundText-v0"``.
        num_envs: N, the number of envs (>= 1).
        env_kwargs: constructor kwargs given to every env.
        mode: ``"sync"`` (one process) or ``"subprocess"`` (one worker process per env).
        context: subprocess mode only: multiprocessing start method (default forkserver, else spawn).
        timeout: subprocess mode only: seconds to wait for a worker's answer before raising EnvWorkerError.

    Returns:
        A ``SyncVectorTextEnv`` or a ``SubprocVectorTextEnv``, not yet reset.
    """
    if mode not in _MODES:
        raise ValueError(f"make_vector_env: mode must be one of {_MODES}, got {mode!r}")
    if num_envs < 1:
        raise ValueError(f"make_vector_env: num_envs must be >= 1, got {num_envs}")
    if env_id not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("sacglam/"))
        raise ValueError(f"make_vector_env: unknown env id {env_id!r}; registered sacglam envs: {known}")
    fns = [functools.partial(_make_env, env_id, dict(env_kwargs or {})) for _ in range(num_envs)]
    if mode == "sync":
        return SyncVectorTextEnv(fns)
    return SubprocVectorTextEnv(fns, context=context, timeout=timeout)


__all__ = [
    "EnvWorkerError",
    "SubprocVectorTextEnv",
    "SyncVectorTextEnv",
    "VectorStepResult",
    "make_vector_env",
]
