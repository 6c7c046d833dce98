"""scripts/export_hindsight.py: hindsight datasets (messages, sft, dpo) from a run's episode log.

A run folder is made by hand: ``.hydra/config.yaml`` composed from conf/ (Playground-Text, its rules) and an episode
log of real Playground-Text episodes (expert and random actions mixed, so failed episodes grasp and grow things).
In every third episode the logged oracle goals are erased, so ``--source oracle`` and ``--source rule`` must differ
exactly there (the rules still read the achievement in the text). Each export is loaded back with
``datasets.load_dataset("json")`` and checked record by record against the episodes: the cut at the first achieving
step, roles alternating, observations only in user turns, the action of each step as the completion, and source /
confidence / ids kept.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from envs.playground_text import playground_expert
from sacglam.episode_log import EPISODES_DIRNAME, EpisodeLog, log_files
from sacglam.episodes import EpisodeRecord
from sacglam.relabel import Relabelled
from sacglam.run import builders, tools
from tests.scripts_util import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
N_EPISODES = 150
ERASED = 3  # the logged oracle goals of every 3rd episode are erased


eh = load_script("export_hindsight")


def play(env: Any, n: int, seed: int = 0, expert_p: float = 0.6) -> list[EpisodeRecord]:
    """n real episodes, acting as an expert with probability ``expert_p`` and at random otherwise; in odd episodes
    the expert pursues another goal (growing a seed of the scene), so failed episodes grow things too."""
    rng = random.Random(seed)
    out, steps = [], 0
    for k in range(n):
        obs, info = env.reset(seed=seed * 10_000 + k)
        goal, cat = info["goal"], info["goal_category"]
        seeds = [f"Grow {x.removesuffix(' seed')}" for x in env.state.objects if x.endswith(" seed")]
        decoy = rng.choice(seeds) if k % 2 and seeds else goal
        o, c, a, r, ach = [obs], [], [], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            cands = list(info["admissible_actions"])
            act = (playground_expert(env.state, decoy) if rng.random() < expert_p else None) or rng.choice(cands)
            obs, rew, terminated, truncated, info = env.step(act)
            c.append(cands)
            a.append(cands.index(act))
            r.append(float(rew))
            ach.append(list(info["achieved_goals"]))
            o.append(obs)
            steps += 1
        out.append(EpisodeRecord(
            id=f"e{k % 4}k{k // 4}", env_index=k % 4, goal=goal, goal_category=cat, observations=o, candidates=c,
            actions=a, rewards=r, achieved=ach, policy_version=[k] * len(a), terminated=terminated,
            truncated=truncated, success=terminated, env_step=steps))
    return out


def make_run(folder: Path, overrides: list[str], n: int = N_EPISODES) -> list[EpisodeRecord]:
    """A run folder (config + episode log); returns the true episodes (the log erases some oracle goals)."""
    cfg = tools.compose_config(["env.num_envs=4", *overrides])
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(tools.config_yaml(cfg))
    episodes = play(builders.make_env_fn(cfg)(), n)
    logged = [dataclasses.replace(ep, achieved=[[] for _ in ep.achieved]) if i % ERASED == 0 else ep
              for i, ep in enumerate(episodes)]
    with EpisodeLog(folder) as log:
        for lo in range(0, n, 4):
            log.write(logged[lo : lo + 4])
    return episodes


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[EpisodeRecord]]:
    folder = tmp_path_factory.mktemp("hindsight") / "run"
    return folder, make_run(folder, [])


def load_rows(path: Path, cache: Path) -> list[dict[str, Any]]:
    """The file as ``datasets.load_dataset("json")`` loads it (a dev dependency: TRL's trainers read it so)."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
    return [dict(r) for r in ds]


def expected(episodes: list[EpisodeRecord], source: str, successes: bool = False) -> list[tuple[EpisodeRecord, int,
                                                                                                 str, str]]:
    """(episode, t*, goal, source) per record of ``messages``, in order: each goal a failed episode achieved (by the
    true oracle for rule, by the logged one for oracle), at its first step; successes under their own goal."""
    out = []
    for i, ep in enumerate(episodes):
        if ep.success:
            if successes:
                out.append((ep, ep.length - 1, ep.goal, "success"))
            continue
        if source == "oracle" and i % ERASED == 0:
            continue
        seen = set()
        for t, goals in enumerate(ep.achieved):
            for g in goals:
                if g not in seen:
                    seen.add(g)
                    out.append((ep, t, g, source))
    return out


def check_turns(msgs: list[dict[str, str]], ep: EpisodeRecord, goal: str, last: int, *, system: str | None = None,
                listed: bool = False) -> None:
    """``msgs``: [system], user o_0 (with the goal), assistant a_0, ..., user o_last[, assistant a_last]."""
    if system is not None:
        assert msgs[0] == {"role": "system", "content": system}
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        t = i // 2
        assert set(m) == {"role", "content"}
        if i % 2 == 0:
            obs = ep.observations[t]
            if listed:
                obs += "\nPossible actions: " + ", ".join(ep.candidates[t])
            assert m == {"role": "user", "content": f"Goal: {goal}\nObservation: {obs}" if t == 0 else obs}
        else:
            assert m == {"role": "assistant", "content": ep.action_text(t)}
            assert m["content"] in ep.candidates[t] and m["content"] not in ep.observations
    assert (len(msgs) + 1) // 2 == last + 1


def check_rows(rows: list[dict[str, Any]], fmt: str, want: list[tuple[EpisodeRecord, int, str, str]],
               **turns: Any) -> None:
    i = 0
    for ep, t_star, goal, source in want:
        meta = {"source": source, "confidence": 1.0, "episode_id": ep.id, "goal": goal, "original_goal": ep.goal,
                "achieved_step": t_star}
        if fmt == "messages":
            row = rows[i]
            i += 1
            assert {k: row[k] for k in meta} == meta and set(row) == {"messages", *meta}
            check_turns(row["messages"], ep, goal, t_star, **turns)
            assert len(row["messages"]) - (turns.get("system") is not None) == 2 * (t_star + 1)  # cut at t*
            continue
        for t in range(t_star + 1):
            if fmt == "dpo" and len(set(ep.candidates[t])) < 2:
                continue
            row = rows[i]
            i += 1
            assert {k: row[k] for k in meta} == meta and row["step"] == t
            check_turns(row["prompt"], ep, goal, t, **turns)
            assert row["prompt"][-1]["role"] == "user"
            answer = [{"role": "assistant", "content": ep.action_text(t)}]
            if fmt == "sft":
                assert set(row) == {"prompt", "completion", "step", *meta} and row["completion"] == answer
            else:
                assert set(row) == {"prompt", "chosen", "rejected", "step", *meta} and row["chosen"] == answer
                [rej] = row["rejected"]
                assert rej["role"] == "assistant" and rej["content"] in ep.candidates[t]
                assert rej["content"] != ep.action_text(t)
    assert i == len(rows)


@pytest.mark.integration
@pytest.mark.parametrize("source", ["oracle", "rule"])
@pytest.mark.parametrize("fmt", ["messages", "sft", "dpo"])
def test_export_formats_record_by_record(run: tuple[Path, list[EpisodeRecord]], fmt: str, source: str,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, episodes = run
    out = tmp_path / f"{fmt}.jsonl"
    assert eh.main([str(folder), "--format", fmt, "--source", source, "--out", str(out), "--quiet"]) == 0
    rows = load_rows(out, tmp_path / "hf")
    want = expected(episodes, source)
    assert len(want) > 20 and {g.split()[0] for _, _, g, _ in want} == {"Grasp", "Grow"}
    assert any(t > 0 for _, t, _, _ in want) and any(t < ep.length - 1 for ep, t, _, _ in want)  # real cuts
    check_rows(rows, fmt, want)
    printed = capsys.readouterr().out
    failed = sum(not ep.success for ep in episodes)
    relabelled = len({ep.id for ep, *_ in want})
    assert f"episodes read: {N_EPISODES} ({failed} failed" in printed
    assert f"relabelled ({source}): {relabelled} of {failed} failed episodes, {len(want)} hindsight goals" in printed
    assert f"records written: {len(rows)} ({fmt})" in printed and "episode-log lines skipped: 0" in printed
    if fmt == "dpo":  # the rejected action is drawn the same way every time
        again = tmp_path / "again.jsonl"
        eh.main([str(folder), "--format", fmt, "--source", source, "--out", str(again), "--quiet"])
        assert again.read_bytes() == out.read_bytes()


def test_successes_max_episodes_and_default_out(run: tuple[Path, list[EpisodeRecord]], tmp_path: Path) -> None:
    src, episodes = run
    folder = tmp_path / "run"
    shutil.copytree(src, folder)
    assert eh.main([str(folder), "--format", "messages", "--include-successes", "--max-episodes", "40",
                    "--quiet"]) == 0
    rows = load_rows(folder / "hindsight-messages-oracle.jsonl", tmp_path / "hf")
    want = expected(episodes[:40], "oracle", successes=True)
    assert any(s == "success" for *_, s in want)
    check_rows(rows, "messages", want)


def test_prompt_options_system_and_listed_actions(tmp_path: Path) -> None:
    system = "You act in a text world."
    episodes = make_run(tmp_path / "run", ["prompt.list_actions=true", f"prompt.system='{system}'"], n=40)
    for fmt in ("messages", "sft"):
        out = tmp_path / f"{fmt}.jsonl"
        assert eh.main([str(tmp_path / "run"), "--format", fmt, "--source", "rule", "--out", str(out),
                        "--quiet"]) == 0
        check_rows(load_rows(out, tmp_path / "hf"), fmt, expected(episodes, "rule"), system=system, listed=True)


def test_llm_source_is_built_from_the_run_config_and_its_confidence_kept(
        run: tuple[Path, list[EpisodeRecord]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The llm source (a scripted stand-in for the model): built with the run's relabel config and env rules, its
    per-goal confidence lands in the records."""
    folder, episodes = run
    seen: dict[str, Any] = {}

    def fake_make_source(cfg: Any, env: Any, rules: Any) -> Any:
        seen.update(source=cfg.source, device=cfg.llm.device, rules=len(rules), env=type(env).__name__)

        def source(eps: list[EpisodeRecord]) -> list[Relabelled]:
            return [Relabelled([list(a) for a in ep.achieved], [[0.5 + 0.01 * t] * len(a) for t, a in
                                                                 enumerate(ep.achieved)]) for ep in eps]
        return source

    monkeypatch.setattr(eh, "make_source", fake_make_source)
    out = tmp_path / "llm.jsonl"
    assert eh.main([str(folder), "relabel.llm.device=meta", "--format", "messages", "--source", "llm", "--out",
                    str(out), "--quiet"]) == 0
    assert seen == {"source": "llm", "device": "meta", "rules": 3, "env": "PlaygroundTextEnv"}
    rows = load_rows(out, tmp_path / "hf")
    want = expected(episodes, "oracle")
    assert [(r["episode_id"], r["goal"]) for r in rows] == [(ep.id, g) for ep, _, g, _ in want]
    assert [r["confidence"] for r in rows] == [0.5 + 0.01 * t for _, t, _, _ in want]
    assert {r["source"] for r in rows} == {"llm"}


def test_a_damaged_log_is_reported_and_the_rest_exported(run: tuple[Path, list[EpisodeRecord]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    src, episodes = run
    folder = tmp_path / "run"
    shutil.copytree(src, folder)
    [path] = log_files(folder / EPISODES_DIRNAME)
    path.write_bytes(path.read_bytes()[:-40])  # a kill tore the last batch's tail
    with pytest.warns(UserWarning, match=r"episodes-00000\.jsonl\.gz:\d+: truncated line"):
        assert eh.main([str(folder), "--format", "messages", "--out", str(tmp_path / "m.jsonl"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "episode-log lines skipped: 1 (first: " in printed and "truncated line" in printed
    n = int(printed.split("episodes read: ")[1].split()[0])
    assert N_EPISODES - 4 <= n < N_EPISODES
    check_rows(load_rows(tmp_path / "m.jsonl", tmp_path / "hf"), "messages", expected(episodes[:n], "oracle"))


def test_missing_folder_and_missing_log_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            run: tuple[Path, list[EpisodeRecord]]) -> None:
    assert eh.main([str(tmp_path / "nope"), "--format", "sft"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope is not a folder" in err
    bare = tmp_path / "bare"
    shutil.copytree(run[0] / ".hydra", bare / ".hydra")
    assert eh.main([str(bare), "--format", "dpo", "--source", "rule"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no episode log in" in err and "logger.episodes=true" in err
    only_log = tmp_path / "only_log"
    shutil.copytree(run[0] / EPISODES_DIRNAME, only_log / EPISODES_DIRNAME)
    assert eh.main([str(only_log), "--format", "sft", "--source", "rule"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("export_hindsight.py: error: RunError:") and "config.yaml" in err


@pytest.mark.integration
def test_cli_runs_as_a_script(run: tuple[Path, list[EpisodeRecord]], tmp_path: Path) -> None:
    out = tmp_path / "sft.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run([sys.executable, str(SCRIPTS / "export_hindsight.py"), str(run[0]), "--format", "sft",
                          "--source", "rule", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "records written:" in res.stdout
    check_rows(load_rows(out, tmp_path / "hf"), "sft", expected(run[1], "rule"))
