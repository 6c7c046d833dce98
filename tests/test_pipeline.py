"""The text <-> tensor glue: StepEncoder (text steps -> buffer transitions), the act function, the tokenizer corpus."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium
import pytest
import torch

import envs  # noqa: F401 - registers the envs
from sacglam.models import LoraConfig, ModelConfig, load_model
from sacglam.pipeline import StepEncoder, make_act_fn, tokenizer_corpus
from sacglam.prompting import PromptCodec
from sacglam.types import ActOutput, TextStep

VOCAB = {w: i for i, w in enumerate(["<pad>", "Goal:", "Obs:", "Act:", "take", "go", "a", "b", "c", "d", "x", "y"])}


def encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


class Goals:
    """A stand-in goal table that records what was registered."""

    def __init__(self) -> None:
        self.rows: list[tuple[list[int], int]] = []

    def register_goal(self, tokens: list[int], limit: int = 0) -> int:
        self.rows.append((list(tokens), limit))
        return len(self.rows) - 1


def codec() -> PromptCodec:
    from sacglam.prompting import PromptTemplate

    return PromptCodec(encode, pad_id=0, template=PromptTemplate(pre="Goal: ", mid=" Obs: ", post=" Act:"),
                       max_goal_tokens=3, max_obs_tokens=4, max_cands=3, max_cand_tokens=2)


def test_step_encoder_exact() -> None:
    goals = Goals()
    enc = StepEncoder(codec(), goals, goal_limit=lambda g: {"take a": 3, "take b": 5}.get(g), max_achieved=2)
    step = TextStep(
        goals=["take a", "take b"], observations=["x y", "a"], candidates=[["go a", "take"], ["go b"]],
        actions=[1, 0], logp=[-0.5, -0.1], rewards=[1.0, 0.0], terminated=[True, False], truncated=[False, True],
        next_observations=["y", "b c d"], next_candidates=[["take"], ["go a", "go b", "take"]],
        achieved_goals=[["take a"], ["take c", "take b"]],
    )
    t = enc(step, policy_version=7)
    # Every distinct goal is registered once, with its tokens and step limit (0 when unknown).
    ids = enc.goal_ids
    assert sorted(ids) == ["take a", "take b", "take c"] and sorted(ids.values()) == [0, 1, 2]
    assert goals.rows[ids["take a"]] == ([VOCAB["take"], VOCAB["a"]], 3)
    assert goals.rows[ids["take b"]] == ([VOCAB["take"], VOCAB["b"]], 5)
    assert goals.rows[ids["take c"]] == ([VOCAB["take"], VOCAB["c"]], 0)
    assert t.goal.tolist() == [ids["take a"], ids["take b"]]
    assert t.achieved.tolist() == [[ids["take a"], -1], [ids["take c"], ids["take b"]]]
    assert t.obs_len.tolist() == [2, 1] and t.obs[0, :2].tolist() == [VOCAB["x"], VOCAB["y"]]
    assert t.next_obs_len.tolist() == [1, 3]
    assert t.cand_len.tolist()[0][:2] == [2, 1] and t.cand_len.tolist()[1][0] == 2
    assert t.next_cand_len.tolist() == [[1, 0, 0], [2, 2, 1]]
    assert t.action.tolist() == [1, 0] and t.reward.tolist() == [1.0, 0.0]
    assert t.terminated.tolist() == [True, False] and t.truncated.tolist() == [False, True]
    assert t.logp.tolist() == pytest.approx([-0.5, -0.1]) and t.policy_version.tolist() == [7, 7]
    # A second step reuses the ids (no re-registration).
    enc(step)
    assert len(goals.rows) == 3


def test_step_encoder_lists_each_states_own_actions() -> None:
    """With prompt.list_actions the stored observation carries the actions of its own state (next_obs: the next
    state's), exactly the ids acting encodes, so sampled prompts equal acted ones."""
    from sacglam.prompting import PromptTemplate

    c = PromptCodec(encode, pad_id=0, template=PromptTemplate(pre="Goal: ", mid=" Obs: ", post=" Act:"),
                    max_goal_tokens=3, max_obs_tokens=8, max_cands=3, max_cand_tokens=2, actions_format=" {actions}",
                    actions_joiner=" ")
    step = TextStep(["take a"], ["x"], [["go a", "take"]], [0], [0.0], [0.0], [False], [False], ["y"], [["go b"]],
                    [[]])
    t = StepEncoder(c, Goals(), goal_limit=lambda g: None, max_achieved=1)(step)
    v = VOCAB
    assert t.obs[0, : int(t.obs_len[0])].tolist() == [v["x"], v["go"], v["a"], v["take"]]
    assert t.next_obs[0, : int(t.next_obs_len[0])].tolist() == [v["y"], v["go"], v["b"]]
    acted, _ = c.encode_prompts(["take a"], ["x"], [["go a", "take"]])
    stored, _ = c.assemble(*c.encode_goals(["take a"]), t.obs, t.obs_len)
    assert torch.equal(acted, stored)


def test_step_encoder_names_max_achieved() -> None:
    enc = StepEncoder(codec(), Goals(), goal_limit=lambda g: None, max_achieved=1)
    step = TextStep(["take a"], ["x"], [["go a"]], [0], [0.0], [0.0], [False], [False], ["x"], [["go a"]],
                    [["take a", "take b"]])
    with pytest.raises(ValueError, match=r"buffer.max_achieved=1.*at least 2"):
        enc(step)


def test_act_fn_encodes_prompts_and_returns_cpu_tensors() -> None:
    seen: dict[str, torch.Tensor] = {}

    class Actor:
        def act(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cand_ids: torch.Tensor,
                cand_mask: torch.Tensor, *, greedy: bool, generator: torch.Generator | None) -> ActOutput:
            seen.update(prompt_ids=prompt_ids, cand_mask=cand_mask)
            return ActOutput(action=cand_mask.any(-1).sum(-1) - 1, logp=torch.zeros(len(prompt_ids)))

    c = codec()
    act = make_act_fn(Actor(), c, greedy=True, device="cpu")
    goals: Sequence[str] = ["take a", "take b"]
    out = act(goals, ["x", "y"], [["go a", "take"], ["go b"]])
    assert out.action.tolist() == [1, 0]  # the last candidate of each state
    expected, _ = c.encode_prompts(goals, ["x", "y"])
    assert torch.equal(seen["prompt_ids"], expected)


def test_tokenizer_corpus_covers_the_prompt_template() -> None:
    """The tiny tokenizer must know the template's words, or every prompt starts with <unk> tokens."""
    env = gymnasium.make("sacglam/PlaygroundText-v0").unwrapped
    template = "Goal: {goal}\nObservation: {obs}\nAction:"
    corpus = tokenizer_corpus(template, env, episodes=5, seed=0)
    _, tok = load_model(ModelConfig(lora=LoraConfig(enabled=False)), corpus=corpus, device="cpu")
    obs, info = env.reset(seed=1)
    ids = tok.encode(template.format(goal=info["goal"], obs=obs), add_special_tokens=False)
    assert tok.unk_token_id not in ids


def test_check_context_names_the_limits() -> None:
    from sacglam.pipeline import check_context

    c = codec()  # prompt width: 1 + 3 + 1 + 4 + 1 = 10 tokens, candidates of 2
    check_context(c, 12)
    check_context(c, None)
    with pytest.raises(ValueError, match=r"need up to 12 positions.*model accepts 11.*buffer.max_obs_tokens"):
        check_context(c, 11)
