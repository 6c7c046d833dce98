"""``python train.py algo=eto``: ETO's rounds driven through the shared run harness (``sacglam.run.harness``).

The phases (``sacglam.algos.eto.trainer.ETOTrainer``) run one at a time; after each, a checkpoint (with
``checkpoint.every`` > 0), so ``resume=auto`` continues exactly (same metrics file, same weights, same pairs files).
Resume, the logs, the checkpoint files, the time limit, the evaluation and the closing are the harness's, as for SAC
and PPO:

* ``time_limit_min`` is checked between phases: the run stops at the next phase boundary, writes its final
  checkpoint, then evaluates the policy it has (unless the last phase was that evaluation) and logs it as its last
  metrics row. The checkpoint does not count that row, so ``resume=auto`` continues the run as if it had not stopped.
* ETO runs on one process (``sacglam.distributed.check_data_parallel`` refuses several).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sacglam.agent import Agent
from sacglam.algos.eto.config import ETOConfig
from sacglam.algos.eto.dpo import Pair, read_pairs
from sacglam.algos.eto.rollout import TaskRunner
from sacglam.algos.eto.trainer import ETOTrainer
from sacglam.checkpoint import agent_state, capture_rng_state, load_agent_state, restore_rng_state
from sacglam.config import TrainConfig
from sacglam.pipeline import make_act_fn
from sacglam.run.builders import build_model, check_sizes, make_agent, make_env_fn, make_evaluator, seed_everything
from sacglam.run.harness import RunContext, print_main


def task_seeds(cfg: TrainConfig, eto: ETOConfig) -> int:
    """The first training-task seed (``seed * tasks``: each run seed its own tasks), checked disjoint from the
    evaluation seeds.

    Raises:
        ValueError: the training tasks' seeds overlap the evaluation's.
    """
    first = cfg.seed * eto.tasks
    n = max(eto.tasks, eto.warm_start_episodes)
    eval_n = cfg.eval.episodes_per_category * 64  # generous: the evaluation plan's seeds lie below this
    if first < cfg.eval.seed + eval_n and cfg.eval.seed < first + n:
        raise ValueError(f"ETO's training tasks use env seeds {first}..{first + n - 1}, which overlap the evaluation "
                         f"seeds from eval.seed={cfg.eval.seed}; choose another seed or eval.seed")
    return first


class ETORun:
    """One ETO run: the trainer's phases, one :meth:`advance` at a time, and the loop's counters.

    Attributes:
        next_eval: the env step at or past which a round's end is evaluated (``eval.every``).
        logged: the env step of the last metrics row written (-1 before the first).
        last_eval: the evaluation of the policy as it is now, or None when a phase has changed the policy or the env
            steps since the last one (then the end of the run evaluates it).
    """

    def __init__(self, ctx: RunContext, agent: Agent, trainer: ETOTrainer, runner: TaskRunner | None,
                 user_pairs: list[Pair] | None, generators: dict[str, torch.Generator]) -> None:
        self.ctx, self.agent, self.trainer, self.runner = ctx, agent, trainer, runner
        self.user_pairs, self.generators = user_pairs, generators
        eto = ctx.cfg.algo
        assert isinstance(eto, ETOConfig)
        self.eto = eto
        self.next_eval, self.logged = ctx.cfg.eval.every, -1
        self.last_eval: dict[str, float] | None = None
        self.phases: dict[str, Callable[[], bool]] = {
            "expert": self._expert, "sft": self._sft, "warm_eval": self._warm_eval, "explore": self._explore,
            "dpo": self._dpo, "round_eval": self._round_eval}

    # ------------------------------------------------------------------------------------------- state, logs
    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (agent, trainer, generators and the loop's counters)."""
        load_agent_state(self.agent, state, self.ctx.resumed_from or "the checkpoint", self.ctx.cfg.model.name)
        eto, saved = self.eto, state["eto"]
        self.trainer.load_state_dict(saved, eto.sft_lr if saved["phase"] == "sft" else eto.lr(int(saved["round"])))
        restore_rng_state(state["rng"], generators=self.generators)
        self.next_eval, self.logged = state["loop"]
        t = self.trainer
        print(f"resumed from {self.ctx.resumed_from}: phase {t.phase}, round {t.round}, epoch {t.epoch}, "
              f"env step {t.env_steps}")

    def checkpoint(self, final: bool = False) -> None:
        """A checkpoint at the trainer's env step (with ``checkpoint.every`` > 0, or ``final``)."""
        if self.ctx.cfg.checkpoint.every or final:
            cfg = self.ctx.cfg
            self.ctx.save(self.trainer.env_steps, {
                **agent_state(self.agent, cfg.model.name, lean=cfg.checkpoint.lean), "eto": self.trainer.state_dict(),
                "rng": capture_rng_state(generators=self.generators), "loop": (self.next_eval, self.logged)})

    def log(self, metrics: dict[str, float]) -> None:
        """One metrics row at the trainer's env step, with the update and env-step counters."""
        t = self.trainer
        metrics.update({"charts/updates": float(t.updates), "charts/expert_env_steps": t.expert_steps,
                        "charts/explore_env_steps": t.explore_steps})
        self.ctx.log(t.env_steps, metrics)
        self.logged = t.env_steps

    # ------------------------------------------------------------------------------------------------ phases
    def advance(self) -> bool:
        """Run the trainer's current phase (one SFT or DPO epoch at most); returns whether to checkpoint after it."""
        return self.phases[self.trainer.phase]()

    def _expert(self) -> bool:
        t, eto = self.trainer, self.eto
        if self.user_pairs is not None:  # DPO on the user's file: no env step, one DPO phase
            t.pairs = self.user_pairs
            t.prepare_dpo(eto.lr(0))
            t.phase = "dpo"
        else:
            self.ctx.write_episodes(t.collect_expert(self.ctx.cfg.total_env_steps))
            t.start_phase(eto.sft_lr)
            t.phase = "sft" if eto.warm_start_episodes else "warm_eval"
        self.last_eval = None
        return True

    def _sft(self) -> bool:
        t, epochs = self.trainer, self.eto.sft_epochs
        if t.epoch < epochs:
            loss = t.sft_epoch()["losses/sft"]
            print(f"warm start: SFT epoch {t.epoch}/{epochs}, loss {loss:.4f}")
            self.last_eval = None
        if t.epoch >= epochs:
            t.phase = "warm_eval"
        return True

    def _warm_eval(self) -> bool:
        t = self.trainer
        self.last_eval = self.ctx.evaluate()
        self.log({**t.round_metrics, **self.last_eval})  # the warm-started policy: the curve's first point
        self.next_eval = t.env_steps + self.ctx.cfg.eval.every
        t.phase = "explore"
        return True

    def _explore(self) -> bool:
        t, total = self.trainer, self.ctx.cfg.total_env_steps
        if t.round >= self.eto.rounds or t.env_steps >= total:
            t.phase = "done"
            return False
        explored = t.explore_and_pair(total - t.env_steps, self.ctx.run_dir)
        self.ctx.write_episodes(explored)
        self.last_eval = None
        m = t.round_metrics
        print(f"round {t.round + 1}: explored {len(explored)} tasks ({t.env_steps} env steps), "
              f"success {m['charts/explore_success']:.3f}, {int(m['charts/pairs'])} pairs")
        return True

    def _dpo(self) -> bool:
        t, epochs = self.trainer, self.eto.epochs
        if t.epoch < epochs:
            m = t.dpo_epoch(self.eto.beta(t.round))
            t.round_metrics.update(m)
            self.last_eval = None
            print(f"round {t.round + 1}: DPO epoch {t.epoch}/{epochs}, loss {m['losses/dpo']:.4f}, margin "
                  f"{m['charts/reward_margin']:.4f}, accuracy {m['charts/pair_accuracy']:.3f}")
        if t.epoch >= epochs:
            t.phase = "round_eval"
        return True

    def _round_eval(self) -> bool:
        t, cfg = self.trainer, self.ctx.cfg
        metrics = dict(t.round_metrics)
        last = self.user_pairs is not None or t.round + 1 >= self.eto.rounds or t.env_steps >= cfg.total_env_steps
        if last or (cfg.eval.every and t.env_steps >= self.next_eval):  # eval.every=0: at the end only
            self.last_eval = self.ctx.evaluate()
            metrics.update(self.last_eval)
            while cfg.eval.every and self.next_eval <= t.env_steps:
                self.next_eval += cfg.eval.every
        else:
            self.last_eval = None
        self.log(metrics)
        t.round += 1
        t.optimizer, t.ref, t.pairs = None, None, []
        t.phase = "done" if self.user_pairs is not None else "explore"
        return True

    # --------------------------------------------------------------------------------------------------- end
    def finish(self, stopped: bool) -> float:
        """The final checkpoint, then the final evaluation and row (unless the policy was just evaluated); closes the
        run.

        The checkpoint comes first: it holds the state the run stopped in (a time-limited run continues from it with
        ``resume=auto`` exactly as if it had not stopped) and does not count the final row, which the resumed run
        drops from the metrics file.

        Args:
            stopped: the time limit ended the run before its last phase.
        """
        t = self.trainer
        self.checkpoint(final=True)
        if self.last_eval is None:  # the policy changed since its last evaluation, or a finished run was resumed
            self.last_eval = self.ctx.evaluate()
            if stopped or t.env_steps > self.logged:
                self.log(dict(self.last_eval))
        if self.runner is not None:
            self.runner.close()
        return self.ctx.close(self.last_eval, f"after {t.env_steps} env steps ({t.expert_steps} expert, "
                                              f"{t.explore_steps} exploring) and {t.updates} updates")


def build_eto(ctx: RunContext) -> ETORun:
    """The model, agent, generators, task runner and trainer of an ETO run (or of DPO on ``algo.pairs_file``); the
    evaluation goes to ``ctx.evaluator``."""
    cfg, device, eto = ctx.cfg, ctx.device, ctx.cfg.algo
    assert isinstance(eto, ETOConfig)
    seed_everything(cfg.seed)
    env_fn = make_env_fn(cfg)
    probe = env_fn()
    model, _, codec = build_model(cfg, probe, device)
    print_main(ctx.dist, check_sizes(cfg, probe, codec))  # a too-small token width stops the run here, not minutes in
    agent = make_agent(cfg, model, device)
    assert isinstance(agent, Agent)
    act_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 2)
    user_pairs = read_pairs(eto.pairs_file) if eto.pairs_file else None
    if user_pairs is not None and not user_pairs:
        raise ValueError(f"algo.pairs_file={eto.pairs_file} holds no pair")
    runner = TaskRunner(env_fn, cfg.env.num_envs) if user_pairs is None else None
    act_explore = make_act_fn(agent, codec, greedy=eto.explore == "greedy", device=device, generator=act_gen)
    trainer = ETOTrainer(eto, agent, codec, device, task_seeds(cfg, eto), list(probe.goal_categories), runner,
                         act_explore, shuffle_gen)
    ctx.evaluator = make_evaluator(cfg, agent, codec, probe, device)
    return ETORun(ctx, agent, trainer, runner, user_pairs, {"act": act_gen, "shuffle": shuffle_gen})


def run_eto(ctx: RunContext) -> float:
    """Train with ETO (or run DPO on ``algo.pairs_file``) in the run ``ctx``; returns the final greedy success."""
    run = build_eto(ctx)
    state = ctx.load_resume()
    if state is not None:
        run.resume(state)
    ctx.open_logs(state, log_step=run.logged, episode_step=run.trainer.env_steps)
    ctx.start_clock()
    stopped = False
    while run.trainer.phase != "done":
        if ctx.time_up_everywhere():
            ctx.announce_time_limit(run.trainer.env_steps)
            stopped = True
            break
        if run.advance():
            run.checkpoint()
    return run.finish(stopped)


__all__ = ["ETORun", "build_eto", "run_eto", "task_seeds"]
