"""scripts/evaluate.py, export_policy.py and zero_shot.py: a policy you can take away.

Tiny runs of a few hundred env steps (full fine-tuning, LoRA, PPO) are trained once per module; the exported folder
is reloaded with plain transformers/peft and must score candidates and Q-values as the checkpoint's agent does;
evaluate.py must reproduce sacglam.evaluate on the same seeds and the run's own final evaluation; bad paths and
corrupt checkpoints end with one line naming them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import envs  # noqa: F401 - registers the sacglam/ env ids
from sacglam.run import builders, tools
from tests.scripts_util import load_script
from tests.test_train import SMALL, read_metrics, run_train

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
TINY_RUN = [*SMALL, "total_env_steps=256", "buffer.capacity=4096", "eval.every=0", "checkpoint.every=0"]
PPO_RUN = [o for o in TINY_RUN if not o.startswith(("batch_size=", "learning_starts=", "buffer."))] + [
    "algo=ppo", "algo.rollout_steps=8", "algo.minibatch_size=16", "algo.value_hidden=[16]"]
# ETO with a LoRA actor: expert warm start and one round of 16 tasks.
ETO_RUN = [o for o in TINY_RUN if not o.startswith(("batch_size=", "learning_starts=", "buffer."))] + [
    "experiment=playground_eto", "model.lora.enabled=true", "model.lora.r=4", "algo.tasks=16",
    "algo.warm_start_episodes=8", "algo.epochs=1", "algo.rounds=1"]


export_policy = load_script("export_policy")
zero_shot = load_script("zero_shot")


def _script(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _train(factory: pytest.TempPathFactory, name: str, args: list[str]) -> Path:
    run = factory.mktemp(name) / "run"
    result = run_train(args, run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def sac_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "sac", TINY_RUN)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "lora", [*TINY_RUN, "model.lora.enabled=true", "model.lora.r=4"])


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "ppo", PPO_RUN)


@pytest.fixture(scope="module")
def eto_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory, "eto", ETO_RUN)


def _states(run: Any, n: int = 6) -> tuple[list[str], list[str], list[list[str]]]:
    """Real states of the run's env: goals, observations and admissible actions after a few scripted steps."""
    env = builders.make_env_fn(run.cfg)()
    goals, obs, cands = [], [], []
    for seed in range(n):
        o, info = env.reset(seed=500 + seed, options={"goal_category": env.goal_categories[seed % 2]})
        for _ in range(seed % 3):
            o, _, term, trunc, info = env.step(info["admissible_actions"][seed % len(info["admissible_actions"])])
            if term or trunc:
                o, info = env.reset(seed=900 + seed)
        goals.append(info["goal"])
        obs.append(o)
        cands.append(list(info["admissible_actions"]))
    return goals, obs, cands


def _encode(codec: Any, states: tuple[list[str], list[str], list[list[str]]]) -> tuple[torch.Tensor, ...]:
    goals, obs, cands = states
    return (*codec.encode_prompts(goals, obs), *codec.candidate_tensors(cands))


def _heads(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((out / "heads.json").read_text()), load_file(str(out / "heads.safetensors"))


def _check_roundtrip(run: Any, model: Any, out: Path) -> None:
    """The exported model, tokenizer, codec and heads act exactly as the checkpoint's agent."""
    from transformers import AutoTokenizer

    from sacglam.agent import QHeads
    from sacglam.losses import candidate_policy
    from sacglam.scoring import score_candidates

    tokenizer = AutoTokenizer.from_pretrained(out)
    codec = tools.exported_codec(out, tokenizer)
    states = _states(run)
    inputs = _encode(codec, states)
    reference = _encode(run.codec, states)
    for a, b in zip(inputs, reference, strict=True):
        assert torch.equal(a, b), "the exported tokenizer + config give other prompt tokens than training's codec"
    policy = json.loads((out / "sacglam_policy.json").read_text())
    model.eval()
    agent = run.agent.eval()
    with torch.no_grad():
        got = score_candidates(model, *inputs, length_norm=policy["agent"]["length_norm"])
        want = score_candidates(agent.model, *reference, length_norm=agent.cfg.length_norm)
        torch.testing.assert_close(got.logp, want.logp, atol=1e-6, rtol=0)
        log_pi, _ = candidate_policy(got.logp, got.valid, policy["agent"]["temperature"])
        agent_out = agent(*reference)
        torch.testing.assert_close(log_pi, agent_out.log_pi, atol=1e-6, rtol=0)
        spec, tensors = _heads(out)
        q_spec = spec["q_heads"]
        heads = QHeads(q_spec["in_dim"], q_spec["hidden"], q_spec["n_q"])
        heads.load_state_dict({k[len(q_spec["prefix"]):]: v for k, v in tensors.items()})
        torch.testing.assert_close(heads(got.hidden, got.valid), agent_out.q, atol=1e-6, rtol=0)
    assert got.valid.sum() == sum(len(c) for c in states[2])


@pytest.mark.integration
def test_export_full_fine_tuning_reloads_with_plain_transformers(sac_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run = tools.load_run(sac_run, ["device=cpu"])
    out = export_policy.export(run, tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(out)
    _check_roundtrip(run, model, out)
    # The online trunk, not the Polyak target copy: they differ after a few hundred updates.
    state = run.agent.model.state_dict()
    target = run.agent.target_model.state_dict()
    assert any(not torch.equal(state[k], target[k]) for k in state)
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "eval/greedy/success/grasp" in card
    assert yaml.safe_load((out / "config.yaml").read_text())["env"]["num_envs"] == 4
    policy = json.loads((out / "sacglam_policy.json").read_text())
    assert policy["prompt"]["template"] == run.cfg.prompt.template
    assert policy["token_limits"]["max_obs_tokens"] == run.cfg.buffer.max_obs_tokens


@pytest.mark.integration
def test_export_lora_holds_the_actor_adapter_only(lora_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tools.load_run(lora_run, ["device=cpu"])
    out = export_policy.export(run, tmp_path / "policy")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and not any("target" in k for k in adapter), "the Polyak target adapter must not be exported"
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "the adapter never trained"
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out)
    _check_roundtrip(run, model, out)
    # The adapter matters: the base alone scores differently.
    from sacglam.scoring import score_candidates

    with torch.no_grad(), model.disable_adapter():
        bare = score_candidates(model, *_encode(run.codec, _states(run))).logp
        adapted = score_candidates(run.agent.model, *_encode(run.codec, _states(run))).logp
    assert not torch.allclose(bare, adapted)
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


@pytest.mark.integration
def test_export_eto_lora_policy_reloads_and_scores_as_in_training(eto_run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert any(json.loads(line).get("charts/round") == 1 for line in (eto_run / "metrics.jsonl").open())
    run = tools.load_run(eto_run, ["device=cpu"])
    out = export_policy.export(run, tmp_path / "policy")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "SFT and DPO never trained it"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    _check_roundtrip(run, model, out)


@pytest.mark.integration
def test_export_ppo_value_head(ppo_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sacglam.algos.ppo.learner import ValueHead
    from sacglam.losses import candidate_policy
    from sacglam.scoring import score_candidates

    run = tools.load_run(ppo_run, ["device=cpu"])
    out = export_policy.export(run, tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    spec, tensors = _heads(out)
    v = spec["value_head"]
    head = ValueHead(v["in_dim"], v["hidden"], v["activation"])
    head.load_state_dict({k[len(v["prefix"]):]: t for k, t in tensors.items()})
    inputs = _encode(run.codec, _states(run))
    with torch.no_grad():
        got = score_candidates(model, *inputs)
        want = run.agent.eval()(*inputs)
        torch.testing.assert_close(head(got.prompt_hidden), want.value, atol=1e-6, rtol=0)
        log_pi, _ = candidate_policy(got.logp, got.valid, run.cfg.agent.temperature)
        torch.testing.assert_close(log_pi, want.log_pi, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_export_cli_refuses_a_non_empty_folder(sac_run: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = _script("export_policy.py", str(sac_run), str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "out") in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _rates(table: str) -> dict[tuple[str, str, str], float]:
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    return {(r[0], r[1], r[2]): float(r[5]) for r in rows}


@pytest.mark.integration
def test_evaluate_cli_matches_sacglam_evaluate_on_the_same_seeds(sac_run: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sacglam.checkpoint import find_latest_checkpoint, load_checkpoint
    from sacglam.evaluate import evaluate
    from sacglam.pipeline import make_act_fn

    result = _script("evaluate.py", str(sac_run), "eval.episodes_per_category=6", "--sample", "eval.seed=4242",
                     "--json", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = _rates(result.stdout)
    assert len(table) == 2 * 4 * 2  # splits x categories (the default four) x modes
    # Independently, as scripts/shortcut_eval.py used to: conf/ + the run's overrides, the run builders.
    overrides = yaml.safe_load((sac_run / ".hydra" / "overrides.yaml").read_text())
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg: Any = OmegaConf.to_object(compose("config", overrides=overrides))
    device = torch.device("cpu")
    probe = builders.make_env_fn(cfg)()
    model, _, codec = builders.build_model(cfg, probe, device)
    agent = tools.Agent(model, cfg.agent)
    ckpt = find_latest_checkpoint(sac_run)
    assert ckpt is not None
    agent.load_state_dict(load_checkpoint(ckpt, map_location=device)["agent"])
    agent.eval()
    gen = torch.Generator()
    sample = make_act_fn(agent, codec, greedy=False, device=device, generator=gen)
    for split, extra in (("train", {}), ("heldout", dict(cfg.env.heldout_kwargs))):
        gen.manual_seed(4242)
        want = evaluate([builders.make_env_fn(cfg, **extra)] * cfg.eval.num_envs,
                        make_act_fn(agent, codec, greedy=True, device=device), sample,
                        categories=probe.goal_categories, episodes_per_category=6, seed=4242)
        for mode in ("greedy", "sample"):
            for c in probe.goal_categories:
                assert table[(split, c, mode)] == pytest.approx(want[f"eval/{mode}/success/{c}"], abs=1e-3)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["seed"] == 4242 and saved["episodes_per_category"] == 6
    assert "4242 + j" in result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("which", ["sac", "ppo", "eto"])
def test_evaluate_cli_reproduces_the_runs_final_evaluation(which: str, request: pytest.FixtureRequest) -> None:
    run: Path = request.getfixturevalue(f"{which}_run")
    result = _script("evaluate.py", str(run / "checkpoints"), "--json", str(run / f"eval-{which}.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    final = [m for m in read_metrics(run) if "eval/greedy/success" in m][-1]
    got = json.loads((run / f"eval-{which}.json").read_text())["metrics"]
    assert {k: v for k, v in got.items() if "/success" in k} == {k: v for k, v in final.items() if "/success" in k}


@pytest.mark.integration
def test_evaluate_cli_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    result = _script("evaluate.py", str(missing), timeout=120)
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_evaluate_cli_corrupt_checkpoint(sac_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sac_run / ".hydra", broken / ".hydra")
    ckpt = broken / "checkpoints" / "step_0000000256.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(os.urandom(4096))
    for target in (ckpt, broken):  # the file itself, and the run folder whose only checkpoint it is
        result = _script("evaluate.py", str(target), timeout=120)
        assert result.returncode != 0
        assert str(ckpt) in result.stderr and "Traceback" not in result.stderr, result.stderr
    (broken / "checkpoints" / "step_0000000256.pt").unlink()
    result = _script("evaluate.py", str(broken), timeout=120)
    assert result.returncode != 0 and "no checkpoint in" in result.stderr


def test_split_overrides_and_variants_by_hand() -> None:
    split, parse = zero_shot.split_overrides, zero_shot.parse_variant
    assert split("a=1,b=[x,y],c='p,q',d={k: [1,2]}") == ["a=1", "b=[x,y]", "c='p,q'", "d={k: [1,2]}"]
    assert split("") == [] and split(" a=1 , ") == ["a=1"]
    assert parse("chat:prompt.chat=true,env.kwargs.goal_categories=[grasp,grow_plant]") == (
        "chat", ["prompt.chat=true", "env.kwargs.goal_categories=[grasp,grow_plant]"])
    assert parse("plain:") == ("plain", [])
    with pytest.raises(ValueError, match="NAME:OVERRIDE"):
        parse("prompt.chat=true")


@pytest.mark.integration
def test_zero_shot_grid_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "zs.json"
    hot = "hot:agent.temperature=3.0,env.kwargs.goal_categories=[grasp],prompt.template='Do {goal}. {obs} >'"
    result = _script("zero_shot.py", "--episodes", "3", "--grid", "env.corpus_episodes=10", "eval.num_envs=3",
                     "--variant", "plain:", "--variant", hot, "--sample", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| plain", "| hot"))]
    assert len(rows) == 2 * 4 * 2 + 2 * 1 * 2  # variant x split x category (plain: the default four) x mode
    assert all(" | 3 | " in r for r in rows)
    assert "env seed 1000000 + j" in result.stdout
    saved = json.loads(out.read_text())["variants"]
    assert saved["hot"]["overrides"][-1] == "prompt.template='Do {goal}. {obs} >'"
    assert {r["category"] for r in saved["hot"]["rows"]} == {"grasp"}


@pytest.mark.integration
def test_zero_shot_bad_override_is_one_line(tmp_path: Path) -> None:
    result = _script("zero_shot.py", "--episodes", "1", "prompt.no_such_option=1", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no_such_option" in result.stderr and len(result.stderr.strip().splitlines()) == 1
