"""The start-up check of the prompt's token widths (sacglam/run/sizes.py), counted by hand on BitFlip-Text.

With a word-level tokenizer a piece's tokens are its words. BitFlip-Text with ``n_bits = n`` (digits, ``flip``
actions): a goal ``Make the bits 1 0 1 1`` has 3 + n words, an observation ``Bits: 0 1 1 0`` 1 + n, every state
offers n actions ``Flip bit i`` of 3 words each, and its goal list holds the 2^n bit strings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.bitflip_text import BitFlipTextEnv
from sacglam.prompting import PromptCodec, PromptTemplate
from sacglam.run.builders import check_sizes
from sacglam.run.sizes import TextSizes, check_text_sizes, measure, summary
from sacglam.run.tools import compose_config

ROOT = Path(__file__).resolve().parents[1]


def word_codec(**limits: object) -> PromptCodec:
    vocab: dict[str, int] = {}
    args: dict = dict(pad_id=0, template=PromptTemplate.from_format("Goal: {goal} Obs: {obs} Act:"),
                      max_goal_tokens=7, max_obs_tokens=5, max_cands=4, max_cand_tokens=3)
    args.update(limits)
    return PromptCodec(lambda text: [vocab.setdefault(w, len(vocab) + 1) for w in text.split()], **args)


def test_the_widths_of_bitflip_counted_by_hand() -> None:
    codec, sizes = word_codec(), TextSizes()
    measure(BitFlipTextEnv(n_bits=4), codec, episodes=4, seed=0, sizes=sizes)
    assert (sizes.goal_tokens, sizes.obs_tokens, sizes.cands, sizes.cand_tokens) == (7, 5, 4, 3)
    assert sizes.obs_over == 0 and sizes.cand.startswith("Flip bit ")
    # Each episode: its states before every step and the last one; 4 episodes of 1..4 steps.
    assert 4 * 2 <= sizes.states <= 4 * 5
    assert summary(sizes, codec).startswith("goals <= 7/7 tokens, <= 4/4 actions per state of <= 3/3 tokens, "
                                            f"observations <= 5/5 tokens (0 of {sizes.states} cut)")


def test_the_listed_goals_are_all_counted() -> None:
    sizes = check_text_sizes("bitflip", {"training": BitFlipTextEnv(n_bits=4)}, word_codec(), episodes=0, seed=0)
    assert len(sizes.goals) == 2**4 and sizes.states == 0 and sizes.goal_tokens == 7


def test_every_width_too_small_is_named_with_the_value_that_fits() -> None:
    codec = word_codec(max_goal_tokens=6, max_cands=3, max_cand_tokens=2)
    with pytest.raises(ValueError) as err:
        check_text_sizes("sacglam/BitFlipText-v0", {"training": BitFlipTextEnv(n_bits=4)}, codec, episodes=2, seed=0)
    msg = str(err.value)
    assert "buffer.max_goal_tokens=6 < 7 (goal 'Make the bits " in msg
    assert "buffer.max_cands=3 < 4 (a state of the training env offers 4 actions)" in msg
    assert "buffer.max_cand_tokens=2 < 3 (action 'Flip bit " in msg
    assert "Set buffer.max_goal_tokens=7 buffer.max_cands=4 buffer.max_cand_tokens=3 (or more" in msg


def test_long_observations_are_cut_not_refused_unless_truncation_is_an_error() -> None:
    env = BitFlipTextEnv(n_bits=4)
    sizes = check_text_sizes("bitflip", {"training": env}, word_codec(max_obs_tokens=4), episodes=2, seed=0)
    assert sizes.obs_tokens == 5 and sizes.obs_over == sizes.states > 0  # every observation has 5 words
    with pytest.raises(ValueError, match=r"buffer.max_obs_tokens=4 < 5 \(an observation has 5 tokens"):
        check_text_sizes("bitflip", {"training": env}, word_codec(max_obs_tokens=4, obs_truncation="error"),
                         episodes=2, seed=0)


def test_an_evaluation_env_wider_than_the_training_env_is_caught() -> None:
    envs = {"training": BitFlipTextEnv(n_bits=4), "heldout evaluation": lambda: BitFlipTextEnv(n_bits=5)}
    with pytest.raises(ValueError) as err:
        check_text_sizes("bitflip", envs, word_codec(), episodes=2, seed=0)
    assert "buffer.max_cands=4 < 5 (a state of the heldout evaluation env offers 5 actions)" in str(err.value)
    assert "buffer.max_goal_tokens=7 < 8" in str(err.value)


def test_near_the_limit_is_flagged() -> None:
    sizes = check_text_sizes("bitflip", {"training": BitFlipTextEnv(n_bits=4)}, word_codec(max_cand_tokens=20),
                             episodes=2, seed=0)
    assert summary(sizes, word_codec(max_cand_tokens=20)).endswith(
        "near the limit, states not reached here may need more: buffer.max_cands")


def test_the_run_checks_its_evaluation_envs_and_can_skip() -> None:
    """``check_sizes`` of a run config: the held-out env of ``env.heldout_kwargs`` is played too; 0 episodes skip."""
    over = ["env=bitflip", "env.kwargs.n_bits=4", "+env.heldout_kwargs.n_bits=5"]
    cfg = compose_config(over)
    with pytest.raises(ValueError, match="a state of the heldout evaluation env offers 5 actions"):
        check_sizes(cfg, BitFlipTextEnv(n_bits=4), word_codec())
    assert check_sizes(compose_config([*over, "env.preflight_episodes=0"]), BitFlipTextEnv(n_bits=4),
                       word_codec()) == "token widths: not checked at start-up (env.preflight_episodes=0)"
    line = check_sizes(compose_config(["env=bitflip", "env.kwargs.n_bits=4"]), BitFlipTextEnv(n_bits=4), word_codec())
    assert line.startswith("token widths checked over 8 episodes per env: goals <= 7/7 tokens, <= 4/4 actions")


@pytest.mark.integration
def test_train_stops_before_training_when_a_width_is_too_small(tmp_path: Path) -> None:
    """train.py with BitFlip's 8 actions per state and buffer.max_cands=6: one error at start-up, no env step run."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=bitflip_her", "buffer.max_cands=6",
         "env.corpus_episodes=20", "threads=1", "logger.progress=false", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "buffer.max_cands=6 < 8 (a state of the training env offers 8 actions)" in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
