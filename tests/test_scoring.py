"""Shared-prefix scoring equals the naive repeat-the-prompt scorer, and the score is a true log-likelihood."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from sacglam.scoring import ScoreOutput, score_candidates, score_candidates_naive

transformers = pytest.importorskip("transformers")

V = 61  # vocabulary of the tiny models


def _build(family: str, attn: str) -> nn.Module:
    """A random-init 2-layer model of the given family (hidden 32-64), built offline from its config."""
    torch.manual_seed(0)
    common: dict[str, Any] = {"vocab_size": V, "attn_implementation": attn}
    if family == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **common
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "t5":
        cfg = transformers.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            **common,
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    else:  # pragma: no cover
        raise ValueError(family)
    return model.eval()


def _random_inputs(
    seed: int, b: int, lp: int, k: int, lc: int, absent: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompts of lengths 1..Lp and candidates of lengths 0..Lc (0 = absent slot), pads = -100."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, lp + 1, (b,), generator=g)
    plen[0] = lp  # at least one unpadded prompt
    prompt_mask = torch.arange(lp) < plen[:, None]
    prompt_ids = torch.where(prompt_mask, torch.randint(2, V, (b, lp), generator=g), -100)
    clen = torch.randint(1, lc + 1, (b, k), generator=g)
    clen = torch.where(torch.rand(b, k, generator=g) < absent, 0, clen)
    clen[:, 0] = torch.randint(1, lc + 1, (b,), generator=g)  # every state has a candidate
    cand_mask = torch.arange(lc) < clen[..., None]
    cand_ids = torch.where(cand_mask, torch.randint(2, V, (b, k, lc), generator=g), -100)
    return prompt_ids, prompt_mask, cand_ids, cand_mask


def _assert_close(a: ScoreOutput, b: ScoreOutput, atol: float = 1e-5) -> None:
    assert torch.equal(a.valid, b.valid)
    torch.testing.assert_close(a.logp, b.logp, atol=atol, rtol=0)
    torch.testing.assert_close(a.hidden, b.hidden, atol=atol, rtol=0)


FAMILIES = ["llama", "qwen2", "gpt2", "t5"]


SHARED_CASES = [(f, a, "packed") for f in FAMILIES for a in ("eager", "sdpa")]
SHARED_CASES += [(f, a, "cache") for f in FAMILIES[:3] for a in ("eager", "sdpa")]  # method is decoder-only


@pytest.mark.parametrize(("family", "attn", "method"), SHARED_CASES)
def test_shared_equals_naive(family: str, attn: str, method: str) -> None:
    torch.set_num_threads(1)
    model = _build(family, attn)
    cases = [(0, 3, 9, 1, 4), (1, 4, 12, 5, 6), (2, 2, 7, 16, 3)]  # (seed, B, Lp, K, Lc)
    with torch.no_grad():
        for seed, B, Lp, K, Lc in cases:
            args = _random_inputs(seed, B, Lp, K, Lc)
            shared = score_candidates(model, *args, method=method)
            naive = score_candidates_naive(model, *args)
            assert shared.logp.shape == (B, K)
            assert shared.hidden.shape[:2] == (B, K)
            _assert_close(shared, naive)
            # absent slots: exactly 0 score, zero features; present ones have a finite negative score
            assert torch.equal(shared.valid, args[3].any(-1))
            assert torch.all(shared.logp[~shared.valid] == 0.0)
            assert torch.all(shared.hidden[~shared.valid] == 0.0)
            assert torch.all(shared.logp[shared.valid] < 0.0)
            for length_norm in (True,):
                sn = score_candidates(model, *args, length_norm=length_norm, method=method)
                nn_ = score_candidates_naive(model, *args, length_norm=length_norm)
                _assert_close(sn, nn_)
                n_tok = args[3].sum(-1).clamp(min=1)
                torch.testing.assert_close(sn.logp, shared.logp / n_tok, atol=1e-6, rtol=0)


def test_candidate_order_and_prompt_padding_do_not_matter() -> None:
    """A candidate's score depends only on (real prompt tokens, its own tokens): extra prompt padding, other
    candidates and slot order change nothing (would fail with wrong position ids or a leaking block mask)."""
    model = _build("llama", "sdpa")
    prompt_ids, prompt_mask, cand_ids, cand_mask = _random_inputs(3, 2, 6, 4, 5, absent=0.0)
    with torch.no_grad():
        base = score_candidates(model, prompt_ids, prompt_mask, cand_ids, cand_mask)
        pad = 5
        more = score_candidates(
            model,
            torch.nn.functional.pad(prompt_ids, (0, pad), value=7),
            torch.nn.functional.pad(prompt_mask, (0, pad)),
            cand_ids.flip(1),
            cand_mask.flip(1),
        )
        alone = score_candidates(model, prompt_ids, prompt_mask, cand_ids[:, 2:3], cand_mask[:, 2:3])
    torch.testing.assert_close(more.logp.flip(1), base.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.logp[:, 0], base.logp[:, 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.hidden[:, 0], base.hidden[:, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "method"), [("llama", "packed"), ("llama", "cache"), ("t5", "packed")])
def test_gradients_equal(family: str, method: str) -> None:
    model = _build(family, "eager")
    args = _random_inputs(4, 3, 8, 6, 4)
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))

    def grads(fn: Any) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = fn(model, *args)
        loss = (out.logp * w).sum() + out.hidden.pow(2).sum() * 0.1
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_shared = grads(lambda *a: score_candidates(*a, method=method))
    g_naive = grads(score_candidates_naive)
    assert g_shared.keys() == g_naive.keys()
    assert len(g_shared) == len(list(model.parameters()))  # every weight, LM head and embeddings included
    for name in g_shared:
        assert torch.isfinite(g_shared[name]).all(), name
        torch.testing.assert_close(g_shared[name], g_naive[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in g_shared.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_score_matches_the_models_own_label_loss(family: str) -> None:
    """Independent of both scorers: HF's cross-entropy with labels on the candidate tokens only, times their count,
    is minus the candidate's log-likelihood."""
    model = _build(family, "eager")
    prompt = torch.tensor([[5, 9, 11, 3, 7]])
    cand = torch.tensor([[8, 2, 30, 4]])
    with torch.no_grad():
        out = score_candidates(model, prompt, torch.ones_like(prompt, dtype=torch.bool), cand[None], (cand > 0)[None])
        if family == "t5":
            loss = model(input_ids=prompt, labels=cand).loss
        else:
            ids = torch.cat([prompt, cand], dim=1)
            labels = torch.cat([torch.full_like(prompt, -100), cand], dim=1)
            loss = model(input_ids=ids, labels=labels).loss
    assert out.logp[0, 0].item() == pytest.approx(-4 * loss.item(), abs=1e-4)


def test_bench_script_quick_run() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_scoring.py"
    spec = importlib.util.spec_from_file_location("bench_scoring", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        rows = bench.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [r["K"] for r in rows] == [2, 4]
    for r in rows:
        assert r["max abs dlogp"] < 1e-4
        assert r["token saving"] > 1.0 and r["ratio packed"] > 0.0 and r["ratio cache"] > 0.0


def test_policy_over_valid_candidates_sums_to_one() -> None:
    model = _build("gpt2", "sdpa")
    args = _random_inputs(5, 4, 6, 7, 3, absent=0.4)
    with torch.no_grad():
        out = score_candidates(model, *args)
    masked = out.logp.masked_fill(~out.valid, float("-inf"))
    pi = masked.log_softmax(-1).exp()
    torch.testing.assert_close(pi.sum(-1), torch.ones(4), atol=1e-6, rtol=0)
    assert torch.all(pi[~out.valid] == 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# a bigram stub whose logits we choose: the score must be a sum of log-softmax values, not raw logits


class _StubTrunk(nn.Module):
    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


class _BigramLM(nn.Module):
    """hidden = one-hot(current token); logits = table[current token]: the next-token distribution is chosen."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        n = table.shape[0]
        self.config = SimpleNamespace(is_encoder_decoder=False, _attn_implementation="eager")
        self.embed = nn.Embedding(n, n)
        self.embed.weight.data = torch.eye(n)
        self.head = nn.Linear(n, n, bias=False)
        self.head.weight.data = table.t().clone()  # logits = onehot @ table
        self.base_model = _StubTrunk(self.embed)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        h = self.embed(input_ids)
        return SimpleNamespace(logits=self.head(h), hidden_states=(h,))


def test_hand_computed_bigram_scores() -> None:
    # next-token logits after token 0, 1, 2
    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    model = _BigramLM(table)
    prompt_ids = torch.tensor([[2, 1, 9], [0, 9, 9]])  # 9 = pad under the mask
    prompt_mask = torch.tensor([[True, True, False], [True, False, False]])
    cand_ids = torch.tensor([[[2, 0], [1, 9], [9, 9]], [[0, 2], [2, 9], [1, 1]]])
    cand_mask = cand_ids != 9

    def lsm(row: list[float], i: int) -> float:
        return row[i] - math.log(sum(math.exp(x) for x in row))

    t = table.tolist()
    # state 0 ends with token 1; state 1 ends with token 0
    expected = [
        [lsm(t[1], 2) + lsm(t[2], 0), lsm(t[1], 1), 0.0],
        [lsm(t[0], 0) + lsm(t[0], 2), lsm(t[0], 2), lsm(t[0], 1) + lsm(t[1], 1)],
    ]
    raw = t[1][2] + t[2][0]  # what the published scorer summed
    for fn in (score_candidates, score_candidates_naive):
        out = fn(model, prompt_ids, prompt_mask, cand_ids, cand_mask)
        torch.testing.assert_close(out.logp, torch.tensor(expected), atol=1e-6, rtol=0)
        assert abs(out.logp[0, 0].item() - raw) > 1.0
        # hidden = one-hot of the candidate's last token
        assert out.hidden[0, 0].tolist() == [1.0, 0.0, 0.0]
        assert out.hidden[1, 2].tolist() == [0.0, 1.0, 0.0]
        assert out.hidden[0, 2].tolist() == [0.0, 0.0, 0.0]
        normed = fn(model, prompt_ids, prompt_mask, cand_ids, cand_mask, length_norm=True)
        assert normed.logp[1, 0].item() == pytest.approx(expected[1][0] / 2, abs=1e-6)
        assert normed.logp[1, 1].item() == pytest.approx(expected[1][1], abs=1e-6)


def test_shape_errors_name_the_problem() -> None:
    model = _BigramLM(torch.zeros(3, 3))
    p = torch.zeros(2, 3, dtype=torch.long)
    m = torch.ones(2, 3, dtype=torch.bool)
    c = torch.zeros(3, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="prompt batch 2 != candidate batch 3"):
        score_candidates(model, p, m, c, c.bool())
    with pytest.raises(ValueError, match=r"cand_ids must be \[B, K, Lc\]"):
        score_candidates(model, p, m, c[0], c[0].bool())
    with pytest.raises(ValueError, match=r"method='kv'\): use 'packed' or 'cache'"):
        score_candidates(model, p, m, c[:2], c[:2].bool(), method="kv")
    with pytest.raises(ValueError, match=r"prompt_ids must be \[B, Lp\]"):
        score_candidates_naive(model, p, m[:, :2], c[:2], c[:2].bool())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_equals_naive_bf16_cuda(family: str) -> None:
    model = _build(family, "sdpa").to("cuda", torch.bfloat16)
    args = tuple(t.cuda() for t in _random_inputs(6, 4, 20, 8, 5))
    with torch.no_grad():
        shared = score_candidates(model, *args)
        naive = score_candidates_naive(model, *args)
    assert shared.logp.dtype == torch.float32
    torch.testing.assert_close(shared.logp, naive.logp, atol=0.15, rtol=0.02)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_trimming_unused_padding_changes_nothing(family: str) -> None:
    """Extra all-padding columns and slots (as fixed-width buffers produce) are cut before the pass, results equal."""
    model = _build(family, "eager").eval()
    pi, pm, ci, cm = _random_inputs(3, b=4, lp=6, k=5, lc=3)
    # Pad by hand: 7 more prompt columns, 4 more candidate slots, 2 more candidate token columns, all masked out.
    pi_p = torch.nn.functional.pad(pi, (0, 7), value=-100)
    pm_p = torch.nn.functional.pad(pm, (0, 7), value=False)
    ci_p = torch.nn.functional.pad(ci, (0, 2, 0, 4), value=-100)
    cm_p = torch.nn.functional.pad(cm, (0, 2, 0, 4), value=False)
    with torch.no_grad():
        ref = score_candidates(model, pi, pm, ci, cm, trim=False)
        full = score_candidates(model, pi_p, pm_p, ci_p, cm_p, trim=False)
        trimmed = score_candidates(model, pi_p, pm_p, ci_p, cm_p, trim=True)
    assert trimmed.logp.shape == (4, 9) and trimmed.hidden.shape[:2] == (4, 9)
    _assert_close(trimmed, full)
    torch.testing.assert_close(trimmed.logp[:, :5], ref.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(trimmed.hidden[:, :5], ref.hidden, atol=1e-5, rtol=0)
    assert not trimmed.valid[:, 5:].any() and (trimmed.logp[:, 5:] == 0).all()


@pytest.mark.parametrize(("family", "method"), [("llama", "packed"), ("gpt2", "cache"), ("t5", "packed")])
def test_int32_ids_score_as_int64(family: str, method: str) -> None:
    """A replay batch's int32 token ids (``sacglam.types.BATCH_ID_DTYPE``) score exactly as the same ids in int64, in
    every path (trimmed or not, lean or not, rows selected, the naive scorer), gradients included."""
    model = _build(family, "eager").train(False)
    pi, pm, ci, cm = _random_inputs(4, b=5, lp=7, k=4, lc=3)
    rows = torch.tensor([True, False, True, True, False])
    variants: list[dict[str, Any]] = [dict(trim=True), dict(trim=False), dict(trim=True, lean=False),
                                      dict(trim=True, rows=rows)]
    with torch.no_grad():
        for kw in variants:
            want = score_candidates(model, pi, pm, ci, cm, method=method, **kw)
            got = score_candidates(model, pi.int(), pm, ci.int(), cm, method=method, **kw)
            for name in ("logp", "hidden", "valid", "prompt_hidden"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (kw, name)
        want, got = score_candidates_naive(model, pi, pm, ci, cm), score_candidates_naive(model, pi.int(), pm,
                                                                                          ci.int(), cm)
        assert torch.equal(got.logp, want.logp) and torch.equal(got.hidden, want.hidden)
    grads = []
    for p_ids, c_ids in ((pi, ci), (pi.int(), ci.int())):
        model.zero_grad()
        score_candidates(model, p_ids, pm, c_ids, cm, method=method).logp.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) > 0 and len(grads[0]) == len(grads[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
