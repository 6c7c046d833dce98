"""Memory-lean scoring (issue 15) equals the naive reference in values and gradients, and is lean where it claims.

The lean path (``score_candidates(lean=True)``, the default) gathers the hidden states of real candidate tokens,
takes the vocabulary log-softmax in chunks (forward and backward), and decodes a seq2seq state's K candidates as
one packed decoder sequence. Each test below fails on a wrong mask, position, block layout, scale or gradient, and
the two "lean" tests also fail on the old path (``lean=False``), which they check.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sacglam.scoring import ScoreOutput, _lm_logits, chunked_token_logp, score_candidates, score_candidates_naive

transformers = pytest.importorskip("transformers")

V = 61  # vocabulary of the tiny models
ATOL = 1e-5  # fp32, values and gradients (the bar)


def _build(family: str, attn: str = "eager", **extra: Any) -> nn.Module:
    """A random-init 2-layer model shaped like one of the three target families (hidden 32-64)."""
    torch.manual_seed(0)
    common: dict[str, Any] = {"vocab_size": V, "attn_implementation": attn, **extra}
    if family == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, **common,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=True, **common,
        )  # fmt: skip
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family in ("t5", "flan-t5"):
        # "t5": original T5, tied head and decoder output scaled by d_model ** -0.5 before it; "flan-t5": v1.1 style,
        # gated-gelu, no rescaling (transformers reads tie_word_embeddings=False as "do not scale").
        flan = family == "flan-t5"
        cfg = transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu" if flan else "relu", decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1, **({"tie_word_embeddings": False} if flan else {}), **common,
        )  # fmt: skip
        model = transformers.T5ForConditionalGeneration(cfg)
        assert model.config.scale_decoder_outputs == (not flan)
    else:  # pragma: no cover
        raise ValueError(family)
    return model.eval()


def _inputs(
    seed: int, b: int, lp: int, k: int, lc: int, *, extra_pad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompts (lengths 1..Lp), candidates of 0..Lc tokens (0 = absent slot), pads = -100.

    With ``extra_pad`` the tensors also carry unused columns and slots (as fixed-width buffers do): 3 more prompt
    columns, 2 more candidate slots, 2 more token columns, all masked out.
    """
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, lp + 1, (b,), generator=g)
    plen[0] = lp
    prompt_mask = torch.arange(lp) < plen[:, None]
    prompt_ids = torch.where(prompt_mask, torch.randint(2, V, (b, lp), generator=g), -100)
    clen = torch.randint(1, lc + 1, (b, k), generator=g)
    clen = torch.where(torch.rand(b, k, generator=g) < 0.25, 0, clen)
    clen[:, 0] = torch.randint(1, lc + 1, (b,), generator=g)
    clen[0, 0] = lc  # the token columns are used
    cand_mask = torch.arange(lc) < clen[..., None]
    cand_ids = torch.where(cand_mask, torch.randint(2, V, (b, k, lc), generator=g), -100)
    if extra_pad:
        prompt_ids = F.pad(prompt_ids, (0, 3), value=-100)
        prompt_mask = F.pad(prompt_mask, (0, 3), value=False)
        cand_ids = F.pad(cand_ids, (0, 2, 0, 2), value=-100)
        cand_mask = F.pad(cand_mask, (0, 2, 0, 2), value=False)
    return prompt_ids, prompt_mask, cand_ids, cand_mask


def _assert_outputs_close(a: ScoreOutput, b: ScoreOutput) -> None:
    """1e-5 absolute, plus 1e-6 relative (8 float32 ulps) for the unscaled Flan-T5 shape, whose random-init
    candidates score down to -80 (one ulp there is 8e-6)."""
    assert torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.logp, b.logp, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(a.hidden, b.hidden, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(a.prompt_hidden, b.prompt_hidden, atol=ATOL, rtol=1e-6)


def _grads(model: nn.Module, fn: Callable[..., ScoreOutput], args: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Gradients w.r.t. every trainable weight of ``sum(w * logp) + sum(u * hidden) + sum(z * prompt_hidden)``
    (random fixed w, u, z: every output element matters, with its own weight)."""
    model.zero_grad(set_to_none=True)
    out = fn(model, *args)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.logp.shape, generator=g)
    u = torch.randn(out.hidden.shape, generator=g) * 0.1
    z = torch.randn(out.prompt_hidden.shape, generator=g) * 0.1
    ((out.logp * w).sum() + (out.hidden * u).sum() + (out.prompt_hidden * z).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict[str, Any], ref: dict[str, Any], model: nn.Module) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == ref.keys() == trainable  # every trainable weight gets a gradient, and only those
    for name in ref:
        # 1e-5 of the gradient's own scale: the tied embedding's gradient reaches ~50 on these tiny models, where
        # float32 summation order alone moves it by ~1e-5 (the old path differs from the naive one as much).
        scale = max(1.0, float(ref[name].abs().max()))
        torch.testing.assert_close(got[name], ref[name], atol=ATOL * scale, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


CASES = [
    (family, attn, method)
    for family in ("llama", "qwen2", "t5", "flan-t5")
    for attn in ("eager", "sdpa")
    for method in (("packed", "cache") if "t5" not in family else ("packed",))
]


@pytest.mark.parametrize(("family", "attn", "method"), CASES)
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_lean_equals_naive_values_and_gradients(family: str, attn: str, method: str, k: int, head: str) -> None:
    """Values (logp, hidden, prompt_hidden, valid) and gradients of the lean scorer equal the naive reference
    within 1e-5, with padded prompts, slots and tokens, absent candidates, length_norm on and off, and a chunk of 3
    rows (far fewer than the real tokens, so chunking runs). ``head``: the LM head trains (full fine-tuning: the
    backward recomputes each chunk's logits) or is frozen (as under LoRA: the gradient w.r.t. the hidden states is
    taken in the forward pass and only scaled in backward)."""
    torch.set_num_threads(1)
    model = _build(family, attn)
    if head == "frozen":
        model.get_output_embeddings().weight.requires_grad_(False)
    args = _inputs(k, b=3, lp=7, k=k, lc=4)
    n_real = int(args[3].sum())
    assert n_real > 3
    for length_norm in (False, True):

        def lean(m: nn.Module, *a: torch.Tensor, ln: bool = length_norm) -> ScoreOutput:
            return score_candidates(m, *a, length_norm=ln, method=method, logit_chunk=3)

        def naive(m: nn.Module, *a: torch.Tensor, ln: bool = length_norm) -> ScoreOutput:
            return score_candidates_naive(m, *a, length_norm=ln)

        with torch.no_grad():
            ref = naive(model, *args)
            _assert_outputs_close(lean(model, *args), ref)
        assert torch.all(ref.logp[ref.valid] < 0) and torch.all(ref.logp[~ref.valid] == 0)
        _assert_grads_close(_grads(model, lean, args), _grads(model, naive, args), model)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_untrimmed_and_old_paths_equal_the_lean_one(family: str) -> None:
    """``trim=False`` (the LM head then runs on every slot, still in chunks) and ``lean=False`` (the old path) give
    the lean path's values and gradients."""
    model = _build(family)
    args = _inputs(11, b=4, lp=6, k=6, lc=3)

    def lean(m: nn.Module, *a: torch.Tensor) -> ScoreOutput:
        return score_candidates(m, *a, logit_chunk=5)

    ref_out = score_candidates(model, *args)
    ref = _grads(model, lean, args)
    for kwargs in ({"trim": False, "logit_chunk": 4}, {"lean": False}, {"lean": False, "trim": False}):

        def fn(m: nn.Module, *a: torch.Tensor, kw: dict[str, Any] = kwargs) -> ScoreOutput:
            return score_candidates(m, *a, **kw)

        _assert_outputs_close(fn(model, *args), ref_out)
        _assert_grads_close(_grads(model, fn, args), ref, model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_seq2seq_cross_attention_projects_the_prompt_once_per_state(attn: str) -> None:
    """Every decoder layer's cross-attention key/value projections see the encoder output with batch B (one copy per
    state), never the [B * K, Lp, H] repeat; the old path, checked too, does build it."""
    model = _build("t5", attn)
    B, K = 3, 5
    args = _inputs(2, b=B, lp=6, k=K, lc=3, extra_pad=False)
    assert bool(args[3].any(-1).all(0).any())  # some slot is present in every state, so trimming keeps K = 5 slots
    seen: list[tuple[int, ...]] = []
    hooks = []
    for block in model.decoder.block:
        for proj in (block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v):
            hooks.append(proj.register_forward_pre_hook(lambda _m, inp: seen.append(tuple(inp[0].shape))))
    try:
        for lean, batch in ((True, B), (False, B * K)):
            seen.clear()
            out = score_candidates(model, *args, lean=lean)
            out.logp.sum().backward()
            assert len(seen) == 2 * len(model.decoder.block)
            assert {s[:2] for s in seen} == {(batch, 6)}, (lean, seen)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(("family", "head"), [("qwen2", "frozen"), ("qwen2", "trainable"), ("t5", "trainable")])
def test_lm_head_runs_on_real_tokens_in_chunks(family: str, head: str) -> None:
    """The LM head only ever sees ``logit_chunk`` rows at a time, forward and backward, and in total exactly the
    real candidate tokens (once in the forward pass; once more in backward only when its weights train). The old
    path, checked too, runs it once on every slot of the batch."""
    model = _build(family)
    if head == "frozen":
        model.get_output_embeddings().weight.requires_grad_(False)
    args = _inputs(5, b=4, lp=6, k=7, lc=4)
    n_real = int(args[3].sum())
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, inp: calls.append(inp[0].numel() // inp[0].shape[-1])  # rows, whatever the leading dims
    )
    try:
        out = score_candidates(model, *args, logit_chunk=5)
        assert max(calls) <= 5 and sum(calls) == n_real
        calls.clear()
        (out.logp.sum() + out.hidden.sum()).backward()
        assert sum(calls) == (n_real if head == "trainable" else 0) and (not calls or max(calls) <= 5)
        calls.clear()
        with torch.no_grad():
            score_candidates(model, *args, lean=False)
        assert len(calls) == 1 and calls[0] > n_real  # every (trimmed) slot at once
    finally:
        hook.remove()


class _Head(nn.Module):
    """A linear LM head on a stub model whose config asks for Cohere-style logit scaling and Gemma-style
    soft-capping (the post-processing ``_lm_logits`` mirrors)."""

    def __init__(self, h: int, v: int, **config: Any) -> None:
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=False, **config)
        self.head = nn.Linear(h, v, bias=True)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@pytest.mark.parametrize("config", [{}, {"logit_scale": 0.25}, {"final_logit_softcapping": 2.0}])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_token_logp_equals_a_full_log_softmax(config: dict[str, Any], chunk: int) -> None:
    """Values and gradients (w.r.t. the rows and the head's weight and bias) of the chunked log-probs equal a plain
    ``log_softmax`` over the full logits, with the family post-processing applied."""
    torch.manual_seed(3)
    model = _Head(8, 37, **config)
    rows = torch.randn(11, 8, requires_grad=True)
    tokens = torch.randint(0, 37, (11,))
    g = torch.randn(11)

    def run(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        model.zero_grad(set_to_none=True)
        rows.grad = None
        out = fn()
        (out * g).sum().backward()
        assert rows.grad is not None and model.head.weight.grad is not None and model.head.bias.grad is not None
        return out.detach(), rows.grad.clone(), model.head.weight.grad.clone(), model.head.bias.grad.clone()

    def full() -> torch.Tensor:
        lsm = F.log_softmax(_lm_logits(model, rows).float(), -1)
        return lsm.gather(-1, tokens[:, None]).squeeze(-1)

    got = run(lambda: chunked_token_logp(model, rows, tokens, chunk))
    ref = run(full)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_logp(model, rows, tokens, chunk), ref[0], atol=1e-6, rtol=0)


def test_bad_logit_chunk_is_named() -> None:
    model = _build("llama")
    args = _inputs(0, b=1, lp=3, k=2, lc=2)
    with pytest.raises(ValueError, match=r"logit_chunk=0"):
        score_candidates(model, *args, logit_chunk=0)
