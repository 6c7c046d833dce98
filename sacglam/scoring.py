"""Score candidate actions with a language model: ``score(a|s) = sum_t log_softmax(logits)[a_t]``
(docs/design/ALGORITHM.md s1).

Two scorers with one contract:

- :func:`score_candidates` shares the prompt between the K candidates of a state, so one state costs about
  ``Lp + sum Lc`` tokens instead of ``K * Lp``.

  * Decoder-only models (Llama, Qwen2, SmolLM2, GPT-2): each state is packed into one sequence
    ``[prompt, cand_1, ..., cand_K]`` of length ``Lp + K * Lc`` with a 4-D block attention mask (every token sees the
    prompt's real tokens and the earlier real tokens of its own candidate) and position ids that restart right after
    the prompt's last real token for each candidate. The trunk runs once; the LM head is applied only at the
    positions that predict candidate tokens (the first candidate token is predicted from the prompt's last real
    position).
    ``method="cache"`` is the alternative with the same result: a prompt pass, then the ``B * K`` candidates on the
    prompt's key/value cache repeated K times (cheaper attention for many candidates, more memory). On the tiny CPU
    model ``packed`` was as fast or faster (scripts/bench_scoring.py), so it is the default.
  * Encoder-decoder models (T5 / Flan-T5): the encoder runs once per state, and so does the decoder: the K
    candidates are packed into one decoder sequence ``[start, c_1 ...] [start, c_2 ...] ...`` (each block with its
    own start token) under a block-diagonal causal mask, so the cross-attention keys/values over the prompt are
    projected once per state (batch B), not once per candidate over K copies of the encoder output (batch B * K).

  Memory-lean log-probs (issue 15, the default ``lean=True``): the hidden states predicting *real* candidate tokens
  are gathered first (their count comes from the one host sync that trimming already does), then the vocabulary
  log-softmax is taken in chunks of rows, forward and backward, so that no ``[tokens, V]`` float32 tensor of the
  whole batch ever exists (:class:`_ChunkedTokenLogp`). ``lean=False`` is the previous, memory-hungry path (all
  candidate slots through the LM head at once; seq2seq with the encoder output repeated K times), kept as the
  baseline of ``scripts/bench_memory.py``.

- :func:`score_candidates_naive` repeats the prompt for every candidate and runs the model's own ``forward``: slow,
  but obviously right. Tests compare the two; keep it.

Both are differentiable (the actor trains through them), accept a ``transformers.PreTrainedModel`` or a
``peft.PeftModel`` wrapping one, and never synchronise with the device (no ``.item()`` / ``nonzero()``) beyond the
one small sync of ``trim=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sacglam.models import unwrap


@dataclass
class ScoreOutput:
    """Scores and critic features of K candidates for B states.

    Attributes:
        logp: [B, K] float32, ``sum_t log_softmax(logits)[a_t]`` over the candidate's tokens (divided by the token
            count when ``length_norm``); exactly 0.0 for absent candidates.
        hidden: [B, K, H] last-layer hidden state at the candidate's last token (decoder-only: where that token is
            the input; seq2seq: the decoder's hidden state where that token is the decoder input); zeros for absent
            candidates. Same dtype as the model.
        valid: [B, K] bool, ``cand_mask.any(-1)``.
        prompt_hidden: [B, H] last-layer hidden state of the state itself, for a value head ``V(s)``
            (PPO-GLAM, docs/design/ALGORITHM.md section 7): decoder-only, at the prompt's last real token (it sees the
            prompt
            only, so it does not depend on the candidates); seq2seq, the decoder's first position (the start token,
            which sees the encoded prompt only). Same dtype as the model.
        n_valid: ``valid.sum()`` as a Python int when the scorer read it in its one host sync (``trim=True``), so
            that per-candidate work downstream (the critic heads) can run on the real slots only without a sync of
            its own; None when unknown.
    """

    logp: torch.Tensor
    hidden: torch.Tensor
    valid: torch.Tensor
    prompt_hidden: torch.Tensor
    n_valid: int | None = None


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _is_encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def _check_inputs(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor
) -> None:
    """Shape checks only (no device sync)."""
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids must be [B, Lp] with prompt_mask of the same shape; got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    if cand_ids.dim() != 3 or cand_mask.shape != cand_ids.shape:
        raise ValueError(
            f"cand_ids must be [B, K, Lc] with cand_mask of the same shape; got {tuple(cand_ids.shape)} and "
            f"{tuple(cand_mask.shape)}"
        )
    if cand_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(
            f"prompt batch {prompt_ids.shape[0]} != candidate batch {cand_ids.shape[0]}: pass one candidate set per "
            "prompt"
        )
    if prompt_ids.shape[1] == 0 or cand_ids.shape[1] == 0 or cand_ids.shape[2] == 0:
        raise ValueError(
            f"empty dimension: prompt_ids {tuple(prompt_ids.shape)}, cand_ids {tuple(cand_ids.shape)}; every prompt "
            "needs at least one token (e.g. BOS) and the candidate tensors at least one slot"
        )


def _token_logp(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities of ``tokens``, zero where ``mask`` is False.

    Args:
        logits: [..., L, V] (any float dtype; the log-softmax is taken in float32 so that bf16 models score stably).
        tokens: [..., L] long; mask: [..., L] bool.

    Returns:
        [..., L] float32.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros_like(tok))


def _finish(
    tok_logp: torch.Tensor,
    last_hidden: torch.Tensor,
    cand_mask: torch.Tensor,
    length_norm: bool,
    prompt_hidden: torch.Tensor,
) -> ScoreOutput:
    """Sum token log-probs per candidate, normalise if asked, zero absent slots.

    Args:
        tok_logp: [B, K, Lc] float32, already zero at padded tokens.
        last_hidden: [B, K, H] hidden state at each candidate's last token (garbage for absent slots).
        cand_mask: [B, K, Lc] bool.
        length_norm: divide the sum by the candidate's token count.
        prompt_hidden: [B, H] the state's own hidden state (see :class:`ScoreOutput`).
    """
    n_tok = cand_mask.sum(-1)  # [B, K]
    valid = n_tok > 0
    logp = tok_logp.sum(-1)
    if length_norm:
        logp = logp / n_tok.clamp(min=1).to(logp.dtype)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    hidden = torch.where(valid.unsqueeze(-1), last_hidden, torch.zeros_like(last_hidden))
    return ScoreOutput(logp=logp, hidden=hidden, valid=valid, prompt_hidden=prompt_hidden)


def _lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply a causal LM's output head to trunk hidden states, as its ``forward`` would.

    Args:
        hidden: [..., H] final (normed) trunk hidden states.

    Returns:
        [..., V] logits.
    """
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head): pass a *ForCausalLM model")
    logits: torch.Tensor = head(hidden)
    config = model.config
    # A few families post-process logits in forward (Cohere scales, Gemma-2 soft-caps); mirror them so that the
    # shared scorer matches the model's own forward for those too.
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# memory-lean log-probs: real tokens only, vocabulary in chunks

LOGIT_CHUNK_ELEMENTS = 1 << 25
"""Default budget of one chunk of logits: 32M values (128 MiB in float32), i.e. about 1,000 rows of Flan-T5's 32k
vocabulary or 220 of Qwen2.5's 152k. Small enough to be noise next to the model, large enough for full matmuls."""


def _decoder_output_scale(model: nn.Module) -> float:
    """The factor T5's ``forward`` multiplies the decoder output by before its LM head (1.0 for other families).

    Original T5 (tied embeddings) rescales by ``d_model ** -0.5``; T5 v1.1 / Flan-T5 do not. transformers 5 stores
    the choice as ``config.scale_decoder_outputs``; older versions read ``tie_word_embeddings``.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return 1.0
    scale = getattr(config, "scale_decoder_outputs", None)
    if scale is None:
        scale = getattr(config, "tie_word_embeddings", False)
    return float(config.d_model) ** -0.5 if scale else 1.0  # type: ignore[union-attr]


def _rows_logp(model: nn.Module, rows: torch.Tensor, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """``log_softmax(head(scale * rows))[tokens]`` row by row.

    Args:
        rows: [N, H] hidden states (model dtype); tokens: [N] long.
        scale: the decoder-output factor of :func:`_decoder_output_scale`.

    Returns:
        [N] float32 (the log-softmax is taken in float32, as in :func:`_token_logp`).
    """
    logits = _lm_logits(model, rows * scale if scale != 1.0 else rows).float()  # [N, V]
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _ChunkedTokenLogp(torch.autograd.Function):
    """Token log-probs of N rows through the LM head, ``chunk`` rows at a time, forward *and* backward.

    A row's log-prob depends on its own hidden state only, so ``d logp_i / d h_i`` (an [H] vector) is computed in
    the forward pass, chunk by chunk, and backward just scales it by the incoming gradient: no [N, V] tensor is kept
    or rebuilt for the gradient w.r.t. the hidden states, and the LM-head matmuls cost what the usual
    forward + backward costs (a fused-linear-cross-entropy trick). Only if the head itself has trainable weights
    (full fine-tuning; frozen under LoRA) does backward recompute each chunk's logits to get their gradient.
    Memory either way: one chunk of ``[chunk, V]`` float32 logits at a time, plus [N, H].
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        tokens: torch.Tensor,
        model: nn.Module,
        scale: float,
        chunk: int,
        need_h: bool,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        """Args: h [N, H]; tokens [N] long; params: the head's trainable weights (for autograd). Returns [N] f32."""
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_rows = torch.empty_like(h) if need_h else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with torch.enable_grad():
                x = h[s:e].detach().requires_grad_(need_h)
                lp = _rows_logp(model, x, tokens[s:e], scale)
                if grad_rows is not None:
                    (g,) = torch.autograd.grad(lp.sum(), x)
                    grad_rows[s:e] = g
            out[s:e] = lp.detach()
            del lp
        ctx.model, ctx.scale, ctx.chunk, ctx.params = model, scale, chunk, params
        empty = h.new_empty(0)
        # h itself is kept only when the head's weights need a gradient (backward recomputes the logits then).
        ctx.save_for_backward(tokens, grad_rows if grad_rows is not None else empty, h if params else empty)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tokens, grad_rows, h = ctx.saved_tensors
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_rows * grad_out.unsqueeze(-1).to(grad_rows.dtype)
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[6:], strict=True) if need]
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        if params:
            acc: list[torch.Tensor | None] = [None] * len(params)
            n = tokens.shape[0]
            for s in range(0, n, ctx.chunk):
                e = min(s + ctx.chunk, n)
                with torch.enable_grad():
                    lp = _rows_logp(ctx.model, h[s:e].detach(), tokens[s:e], ctx.scale)
                    part = torch.autograd.grad(lp, params, grad_outputs=grad_out[s:e], allow_unused=True)
                acc = [a if g is None else g if a is None else a + g for a, g in zip(acc, part, strict=True)]
            it = iter(acc)
            grads = [next(it) if need else None for need in ctx.needs_input_grad[6:]]
        return (grad_h, None, None, None, None, None, *grads)


def chunked_token_logp(
    model: nn.Module, rows: torch.Tensor, tokens: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under the LM head at ``rows``, never holding more than one chunk of logits.

    Args:
        model: the (unwrapped) LM whose ``get_output_embeddings()`` head, post-processing (:func:`_lm_logits`) and
            T5 decoder-output scaling are applied.
        rows: [N, H] final hidden states that predict ``tokens``.
        tokens: [N] long.
        chunk: rows per chunk (default: :data:`LOGIT_CHUNK_ELEMENTS` divided by the vocabulary size).

    Returns:
        [N] float32, differentiable w.r.t. ``rows`` and the head's weights.
    """
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head): pass a *ForCausalLM model")
    if chunk is None:
        vocab = getattr(head, "out_features", None) or int(head.weight.shape[0])
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // int(vocab))
    if chunk < 1:
        raise ValueError(f"logit_chunk must be >= 1 row, got {chunk}")
    scale = _decoder_output_scale(model)
    params = [p for p in head.parameters() if p.requires_grad]
    need_h = rows.requires_grad
    if not torch.is_grad_enabled() or not (need_h or params):
        n = rows.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=rows.device)
        with torch.no_grad():
            for s in range(0, n, chunk):
                out[s : s + chunk] = _rows_logp(model, rows[s : s + chunk], tokens[s : s + chunk], scale)
        return out
    logp: torch.Tensor = _ChunkedTokenLogp.apply(rows, tokens, model, scale, chunk, need_h, *params)
    return logp


def _real_token_logp(
    model: nn.Module,
    table: torch.Tensor,
    pred_index: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    n_real: int | None,
    chunk: int | None,
) -> torch.Tensor:
    """Per-token log-probs of the candidates, computed at real tokens only.

    Args:
        table: [M, H] hidden states (a flattened ``[B, T, H]`` trunk output, or a concatenation).
        pred_index: [B, K, Lc] long, the row of ``table`` whose output predicts each candidate token.
        cand_ids: [B, K, Lc] long (sanitised); cand_mask: [B, K, Lc] bool.
        n_real: ``cand_mask.sum()`` as a Python int when known (trim=True counts it in its one host sync): only
            those rows go through the LM head, gathered by ``torch.nonzero_static`` without a device sync. None
            (trim=False): every slot goes through the head (still in chunks) and padding is masked afterwards.
        chunk: rows per LM-head chunk (None: :data:`LOGIT_CHUNK_ELEMENTS` / V).

    Returns:
        [B, K, Lc] float32, zero at padded tokens.
    """
    flat_mask = cand_mask.reshape(-1)
    flat_index = pred_index.reshape(-1)
    flat_ids = cand_ids.reshape(-1)
    if n_real is None:
        lp = chunked_token_logp(model, table.index_select(0, flat_index), flat_ids, chunk)
        lp = torch.where(flat_mask, lp, torch.zeros_like(lp))
        return lp.view(cand_mask.shape)
    sel = torch.nonzero_static(flat_mask, size=n_real).squeeze(1)  # [n_real], in order; no host sync
    lp = chunked_token_logp(model, table.index_select(0, flat_index[sel]), flat_ids[sel], chunk)
    full = torch.zeros(flat_mask.shape[0], dtype=lp.dtype, device=lp.device).scatter(0, sel, lp)
    return full.view(cand_mask.shape)


# ---------------------------------------------------------------------------------------------------------------------
# shared-prefix scorers


def _packed_attention_mask(
    prompt_mask: torch.Tensor, cand_mask: torch.Tensor, dtype: torch.dtype, as_bool: bool
) -> torch.Tensor:
    """The 4-D block mask of the packed sequence ``[prompt (Lp), cand_1 (Lc), ..., cand_K (Lc)]``.

    Query ``q`` may attend to key ``k`` iff ``k`` is a real token, ``k <= q`` and ``k`` is in the prompt or in the
    same candidate as ``q``. Every query also sees itself, so that no row is fully masked (a fully masked row gives
    NaN in SDPA, and NaN reaches the gradient even where the output is ignored).

    Args:
        prompt_mask: [B, Lp] bool; cand_mask: [B, K, Lc] bool.
        dtype: float dtype of the additive mask (the model's), used when ``as_bool`` is False.
        as_bool: return a boolean mask (True = attend; SDPA) instead of an additive one (0 / dtype min; eager).

    Returns:
        [B, 1, T, T] with ``T = Lp + K * Lc``.
    """
    B, Lp = prompt_mask.shape
    _, K, Lc = cand_mask.shape
    T = Lp + K * Lc
    device = prompt_mask.device
    seg = torch.cat(
        [torch.full((Lp,), -1, device=device), torch.arange(K, device=device).repeat_interleave(Lc)]
    )  # [T]: -1 prompt, k candidate k
    pos = torch.arange(T, device=device)
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [T(q), T(k)]
    same_block = (seg.unsqueeze(0) == -1) | (seg.unsqueeze(0) == seg.unsqueeze(1))
    structure = causal & same_block
    key_real = torch.cat([prompt_mask, cand_mask.reshape(B, K * Lc)], dim=1)  # [B, T]
    allowed = structure.unsqueeze(0) & key_real.unsqueeze(1)  # [B, T, T]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device).unsqueeze(0)
    allowed = allowed.unsqueeze(1)
    if as_bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, neg)


def _score_decoder_shared(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    length_norm: bool,
    lean: bool,
    n_real: int | None,
    chunk: int | None,
) -> ScoreOutput:
    """One packed pass per state (see the module docstring).

    Args:
        model: the unwrapped causal LM; prompt_ids, prompt_mask [B, Lp]; cand_ids, cand_mask [B, K, Lc]
            (sanitised, masks bool).
        length_norm: as in :func:`score_candidates`.
        lean: LM head at real tokens in chunks (:func:`_real_token_logp`); False: all slots at once (baseline).
        n_real: the number of real candidate tokens when known (trim=True), else None.
        chunk: rows per LM-head chunk (None: default).

    Returns:
        :class:`ScoreOutput`.
    """
    B, Lp = prompt_ids.shape
    _, K, Lc = cand_ids.shape
    device = prompt_ids.device
    plen = prompt_mask.sum(-1)  # [B]
    j = torch.arange(Lc, device=device)

    input_ids = torch.cat([prompt_ids, cand_ids.reshape(B, K * Lc)], dim=1)  # [B, T]
    # Each candidate continues right after the prompt's last *real* token, whatever the prompt padding.
    cand_pos = (plen.view(B, 1, 1) + j.view(1, 1, Lc)).expand(B, K, Lc).reshape(B, K * Lc)
    position_ids = torch.cat([torch.arange(Lp, device=device).expand(B, Lp), cand_pos], dim=1)

    trunk: Any = model.base_model  # the bare transformer (LlamaModel, GPT2Model, ...) under the LM head
    if trunk is model:
        raise ValueError(
            f"{type(model).__name__} has no separate trunk under its LM head (base_model is itself): pass a "
            "*ForCausalLM model, or use score_candidates_naive"
        )
    embed = model.get_input_embeddings()  # type: ignore[operator]
    dtype = embed.weight.dtype
    attn_impl = getattr(model.config, "_attn_implementation", "eager")
    mask4d = _packed_attention_mask(prompt_mask, cand_mask, dtype, as_bool=attn_impl == "sdpa")
    out = trunk(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids, use_cache=False)
    h = out.last_hidden_state  # [B, T, H]
    H = h.shape[-1]

    # Position whose output predicts candidate token j: the prompt's last real token for j = 0, else token j - 1.
    block_start = Lp + torch.arange(K, device=device).view(1, K, 1) * Lc  # [1, K, 1]
    pred_pos = torch.where(j.view(1, 1, Lc) == 0, (plen - 1).clamp(min=0).view(B, 1, 1), block_start + j - 1)
    pred_pos = pred_pos.expand(B, K, Lc).reshape(B, K * Lc)
    if lean:
        rows = (torch.arange(B, device=device).view(B, 1) * h.shape[1] + pred_pos).view(B, K, Lc)
        tok_logp = _real_token_logp(model, h.reshape(-1, H), rows, cand_ids, cand_mask, n_real, chunk)
    else:  # the memory-hungry baseline: every slot's [V] logits at once
        h_pred = torch.gather(h, 1, pred_pos.unsqueeze(-1).expand(B, K * Lc, H))
        logits = _lm_logits(model, h_pred).view(B, K, Lc, -1)
        tok_logp = _token_logp(logits, cand_ids, cand_mask)

    clen = cand_mask.sum(-1)  # [B, K]
    last_pos = (block_start.view(1, K) + (clen - 1).clamp(min=0)).view(B, K)
    last_hidden = torch.gather(h, 1, last_pos.unsqueeze(-1).expand(B, K, H))
    prompt_hidden = torch.gather(h, 1, (plen - 1).clamp(min=0).view(B, 1, 1).expand(B, 1, H)).squeeze(1)
    return _finish(tok_logp, last_hidden, cand_mask, length_norm, prompt_hidden)


def _score_decoder_cache(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    length_norm: bool,
    lean: bool,
    n_real: int | None,
    chunk: int | None,
) -> ScoreOutput:
    """Two passes: the prompts alone (keeping their key/value cache), then the ``B * K`` candidates on the cache
    repeated over K. Attention costs ``K * Lc * (Lp + Lc)`` per state instead of ``(Lp + K * Lc) ** 2``, at the price
    of K copies of the prompt's keys and values."""
    B, K, Lc = cand_ids.shape
    device = prompt_ids.device
    trunk: Any = model.base_model
    plen = prompt_mask.sum(-1)  # [B]
    j = torch.arange(Lc, device=device)
    prompt_pass = trunk(input_ids=prompt_ids, attention_mask=prompt_mask.long(), use_cache=True)
    h_prompt = prompt_pass.last_hidden_state  # [B, Lp, H]
    H = h_prompt.shape[-1]
    cache = prompt_pass.past_key_values
    cache.batch_repeat_interleave(K)
    flat_ids = cand_ids.reshape(B * K, Lc)
    flat_mask = cand_mask.reshape(B * K, Lc)
    mask2d = torch.cat([prompt_mask.repeat_interleave(K, dim=0), flat_mask], dim=1).long()  # [B*K, Lp + Lc]
    # Each candidate continues right after the prompt's last *real* token, whatever the prompt padding.
    position_ids = plen.repeat_interleave(K).unsqueeze(1) + j
    second = trunk(
        input_ids=flat_ids, attention_mask=mask2d, position_ids=position_ids, past_key_values=cache, use_cache=True
    )
    h_cand = second.last_hidden_state.view(B, K, Lc, H)
    h_last_prompt = torch.gather(h_prompt, 1, (plen - 1).clamp(min=0).view(B, 1, 1).expand(B, 1, H))  # [B, 1, H]
    if lean:
        # Rows of [h_last_prompt (B rows); h_cand (B*K*Lc rows)]: token 0 is predicted by the prompt's last real
        # position, token j > 0 by candidate position j - 1.
        table = torch.cat([h_last_prompt.squeeze(1), h_cand.reshape(B * K * Lc, H)], dim=0)
        slot = torch.arange(B * K, device=device).view(B, K, 1) * Lc
        first = torch.arange(B, device=device).view(B, 1, 1).expand(B, K, 1)
        rows = torch.where(j.view(1, 1, Lc) == 0, first, B + slot + j.view(1, 1, Lc) - 1)
        tok_logp = _real_token_logp(model, table, rows, cand_ids, cand_mask, n_real, chunk)
    else:  # the memory-hungry baseline: every slot's [V] logits at once
        h_pred = torch.cat([h_last_prompt.unsqueeze(1).expand(B, K, 1, H), h_cand[:, :, :-1]], dim=2)
        logits = _lm_logits(model, h_pred)
        tok_logp = _token_logp(logits, cand_ids, cand_mask)
    clen = cand_mask.sum(-1)  # [B, K]
    last_hidden = torch.gather(h_cand, 2, (clen - 1).clamp(min=0).view(B, K, 1, 1).expand(B, K, 1, H)).squeeze(2)
    return _finish(tok_logp, last_hidden, cand_mask, length_norm, h_last_prompt.squeeze(1))


def _decoder_inputs(model: nn.Module, cand_ids: torch.Tensor, cand_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Decoder inputs ``[start, c_0, ..., c_{Lc-1}]`` and mask for a seq2seq model.

    Args:
        cand_ids, cand_mask: [N, Lc].

    Returns:
        dec_ids [N, Lc + 1] long, dec_mask [N, Lc + 1] bool. Output position ``j`` predicts ``c_j``; the hidden
        state at position ``len(c)`` is where the candidate's last token is the input (the critic's feature).
    """
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "pad_token_id", None)
    if start is None:
        raise ValueError(
            f"{type(model).__name__}.config has neither decoder_start_token_id nor pad_token_id: set one so that the "
            "decoder knows how to start"
        )
    N = cand_ids.shape[0]
    first = torch.full((N, 1), int(start), dtype=cand_ids.dtype, device=cand_ids.device)
    dec_ids = torch.cat([first, cand_ids], dim=1)
    dec_mask = torch.cat([torch.ones_like(cand_mask[:, :1]), cand_mask], dim=1)
    return dec_ids, dec_mask


def _score_seq2seq(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    length_norm: bool,
    shared: bool,
) -> ScoreOutput:
    B, K, Lc = cand_ids.shape
    flat_ids = cand_ids.reshape(B * K, Lc)
    flat_mask = cand_mask.reshape(B * K, Lc)
    dec_ids, dec_mask = _decoder_inputs(model, flat_ids, flat_mask)
    enc_mask = prompt_mask.repeat_interleave(K, dim=0)  # [B*K, Lp]
    kwargs: dict[str, Any] = {
        "attention_mask": enc_mask.long(),
        "decoder_input_ids": dec_ids,
        "decoder_attention_mask": dec_mask.long(),
        "output_hidden_states": True,
        "use_cache": False,
    }
    if shared:
        # Encoder once per state; its outputs (not the prompt) are repeated over the K candidates.
        enc = model.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask.long())  # type: ignore[operator]
        kwargs["encoder_outputs"] = (enc.last_hidden_state.repeat_interleave(K, dim=0),)
    else:
        kwargs["input_ids"] = prompt_ids.repeat_interleave(K, dim=0)
    out = model(**kwargs)
    logits = out.logits[:, :Lc]  # [B*K, Lc, V]
    tok_logp = _token_logp(logits, flat_ids, flat_mask).view(B, K, Lc)
    dh = out.decoder_hidden_states[-1]  # [B*K, Lc + 1, H]
    clen = flat_mask.sum(-1)  # [B*K]
    last_hidden = torch.gather(dh, 1, clen.view(-1, 1, 1).expand(-1, 1, dh.shape[-1])).view(B, K, -1)
    prompt_hidden = dh[:, 0].view(B, K, -1)[:, 0]  # the start token: the same for every candidate of a state
    return _finish(tok_logp, last_hidden, cand_mask, length_norm, prompt_hidden)


def _score_seq2seq_packed(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    length_norm: bool,
    n_real: int | None,
    chunk: int | None,
) -> ScoreOutput:
    """Encoder once per state, decoder once per state over the K candidates packed in one sequence.

    The decoder input of state b is K blocks of width ``W = Lc + 1``, block k = ``[start, c_k0, ..., c_k(Lc-1)]``
    (each block has its own start token), length ``T = K * W``. A 4-D block-diagonal causal mask lets a position see
    the earlier real positions of its own block only; the encoder output is attended with batch B. Why this equals
    one decoder pass per candidate:

    * the self-attention relative position bias of T5 (transformers' ``T5Attention.compute_bias``) is a function
      of ``key_index - query_index`` over the whole packed sequence; blocks are contiguous and start with their own
      start token, so within a block these differences are those of the candidate's own pass, and cross-block
      pairs are masked;
    * T5Stack's ``create_causal_mask`` returns a 4-D mask unchanged (a custom mask), and the attention functions
      combine it with the position bias: SDPA takes a bool mask (``create_position_bias_mask``), eager an additive
      one (0 / dtype min), as in :func:`_packed_attention_mask`;
    * cross-attention has no position bias, and the encoder mask is the prompt mask of the state, the same for all
      of its candidates.

    Args/returns as :func:`_score_decoder_shared` (seq2seq model).
    """
    B, K, Lc = cand_ids.shape
    W = Lc + 1
    device = cand_ids.device
    enc = model.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask.long())  # type: ignore[operator]
    dec_ids, dec_mask = _decoder_inputs(model, cand_ids.reshape(B * K, Lc), cand_mask.reshape(B * K, Lc))
    dec_ids = dec_ids.view(B, K * W)
    attn_impl = getattr(model.config, "_attn_implementation", "eager")
    dtype = model.get_input_embeddings().weight.dtype  # type: ignore[operator]
    # The packed mask with an empty prompt is exactly the block-diagonal causal mask over the K blocks.
    no_prompt = torch.zeros(B, 0, dtype=torch.bool, device=device)
    mask4d = _packed_attention_mask(no_prompt, dec_mask.view(B, K, W), dtype, as_bool=attn_impl == "sdpa")
    decoder: Any = model.get_decoder()  # type: ignore[operator]
    out = decoder(
        input_ids=dec_ids,
        attention_mask=mask4d,
        encoder_hidden_states=enc.last_hidden_state,
        encoder_attention_mask=prompt_mask.long(),
        use_cache=False,
    )
    dh = out.last_hidden_state  # [B, K * W, H], after the final layer norm (= decoder_hidden_states[-1])
    H = dh.shape[-1]
    j = torch.arange(Lc, device=device)
    block_start = torch.arange(K, device=device).view(1, K, 1) * W  # [1, K, 1]
    # Output position j of a block predicts c_j (the input there is the start token for j = 0, c_{j-1} after).
    rows = (torch.arange(B, device=device).view(B, 1, 1) * (K * W) + block_start + j.view(1, 1, Lc)).expand(B, K, Lc)
    tok_logp = _real_token_logp(model, dh.reshape(-1, H), rows, cand_ids, cand_mask, n_real, chunk)
    clen = cand_mask.sum(-1)  # [B, K]
    last_hidden = torch.gather(dh, 1, (block_start.view(1, K) + clen).unsqueeze(-1).expand(B, K, H))
    prompt_hidden = dh[:, 0]  # block 0's start token: sees the encoded prompt only, the same in every block
    return _finish(tok_logp, last_hidden, cand_mask, length_norm, prompt_hidden)


def _sanitise(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace ids under a False mask by 0, so any pad value (even -100) is a valid embedding index; returned as
    int64, which the token log-probs' gathers and some models' inputs need (a replay batch's ids are int32, here
    converted once, after trimming)."""
    return torch.where(mask, ids, torch.zeros_like(ids)).long()


def _used_width(mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """1 + the last index along the final dim where ``mask`` (reduced over ``dims`` first) is True; 0 if none."""
    m = mask.any(dim=dims) if dims else mask
    idx = torch.arange(1, m.shape[-1] + 1, device=m.device)
    return (m.long() * idx).amax()


def _score_shared(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    *,
    length_norm: bool,
    method: str,
    lean: bool,
    n_real: int | None,
    logit_chunk: int | None,
) -> ScoreOutput:
    """Dispatch to the family's shared-prefix scorer (inputs checked and trimmed; see :func:`score_candidates`)."""
    prompt_mask = prompt_mask.bool()
    cand_mask = cand_mask.bool()
    prompt_ids = _sanitise(prompt_ids, prompt_mask)
    cand_ids = _sanitise(cand_ids, cand_mask)
    inner = unwrap(model)  # LoRA layers stay injected and active in the unwrapped model
    if _is_encoder_decoder(inner):
        if lean:
            return _score_seq2seq_packed(
                inner, prompt_ids, prompt_mask, cand_ids, cand_mask, length_norm, n_real, logit_chunk
            )
        return _score_seq2seq(inner, prompt_ids, prompt_mask, cand_ids, cand_mask, length_norm, shared=True)
    fn = _score_decoder_cache if method == "cache" else _score_decoder_shared
    return fn(inner, prompt_ids, prompt_mask, cand_ids, cand_mask, length_norm, lean, n_real, logit_chunk)


def _zero_output(model: nn.Module, b: int, k: int, device: torch.device) -> ScoreOutput:
    """The output of B states with no candidate (no row selected): zeros, no valid slot."""
    weight = unwrap(model).get_input_embeddings().weight
    h = int(weight.shape[1])
    return ScoreOutput(
        logp=torch.zeros(b, k, device=device),
        hidden=torch.zeros(b, k, h, dtype=weight.dtype, device=device),
        valid=torch.zeros(b, k, dtype=torch.bool, device=device),
        prompt_hidden=torch.zeros(b, h, dtype=weight.dtype, device=device),
        n_valid=0,
    )


def _scatter_rows(out: ScoreOutput, sel: torch.Tensor, b: int) -> ScoreOutput:
    """Outputs of the selected rows ``sel`` [n] put back among B rows; the others are zeros with no valid slot."""

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(b, *x.shape[1:]).index_copy(0, sel, x)

    return ScoreOutput(logp=put(out.logp), hidden=put(out.hidden), valid=put(out.valid),
                       prompt_hidden=put(out.prompt_hidden), n_valid=out.n_valid)


def _trimmed(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    rows: torch.Tensor | None = None,
    **kwargs: Any,
) -> ScoreOutput:
    """:func:`_score_shared` on the used part of the inputs, outputs padded back to the K slots (and B rows) given.

    The one host sync reads the used widths, the number of real candidate tokens, the number of real candidate slots
    (``ScoreOutput.n_valid``) and the number of selected ``rows`` together; widths and counts are those of the
    selected rows.
    """
    b, k = cand_ids.shape[:2]
    p_mask, c_mask = prompt_mask.bool(), cand_mask.bool()
    if rows is not None:
        p_mask, c_mask = p_mask & rows[:, None], c_mask & rows[:, None, None]
    stats = [_used_width(p_mask, (0,)), _used_width(c_mask, (0, 2)), _used_width(c_mask, (0, 1)), c_mask.sum(),
             c_mask.any(-1).sum()]
    if rows is not None:
        stats.append(rows.sum())
    widths = torch.stack(stats).tolist()  # the one host sync
    lp, kk, lc = (max(int(w), 1) for w in widths[:3])
    n_real, n_valid = int(widths[3]), int(widths[4])
    cut: tuple[torch.Tensor, ...] = (
        prompt_ids[:, :lp], prompt_mask[:, :lp], cand_ids[:, :kk, :lc], cand_mask[:, :kk, :lc]
    )
    sel = None
    if rows is not None:
        if int(widths[5]) == 0:
            return _zero_output(model, b, k, cand_ids.device)
        sel = torch.nonzero_static(rows, size=int(widths[5])).squeeze(1)  # [n_rows]; no host sync
        cut = tuple(x.index_select(0, sel) for x in cut)
    out = _score_shared(model, *cut, n_real=n_real, **kwargs)
    out.n_valid = n_valid
    if sel is not None:
        out = _scatter_rows(out, sel, b)
    if kk == k:
        return out
    pad = k - kk
    return ScoreOutput(
        logp=torch.nn.functional.pad(out.logp, (0, pad)),
        hidden=torch.nn.functional.pad(out.hidden, (0, 0, 0, pad)),
        valid=torch.nn.functional.pad(out.valid, (0, pad), value=False),
        prompt_hidden=out.prompt_hidden,
        n_valid=n_valid,
    )


def score_candidates(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    *,
    length_norm: bool = False,
    method: str = "packed",
    trim: bool = True,
    lean: bool = True,
    logit_chunk: int | None = None,
    rows: torch.Tensor | None = None,
) -> ScoreOutput:
    """Score K candidates per state, running each prompt once (shared prefix).

    Args:
        model: a ``transformers`` causal LM or seq2seq model, or a ``peft.PeftModel`` wrapping one. Its train/eval
            mode is respected (dropout in train mode makes it differ from the naive scorer).
        prompt_ids: [B, Lp] int64 or int32 (a replay batch's), right padded; every prompt needs at least one
            real token.
        prompt_mask: [B, Lp] bool, True on real tokens (a prefix of each row).
        cand_ids: [B, K, Lc] int64 or int32, right padded; any value under a False mask is ignored.
        cand_mask: [B, K, Lc] bool; a slot whose mask is all False is absent.
        length_norm: divide each score by its candidate's token count.
        method: decoder-only models only. ``"packed"``: one sequence per state with a block attention mask (one
            pass; attention grows as ``(Lp + K * Lc) ** 2``). ``"cache"``: prompt pass, then the candidates on the
            prompt's key/value cache repeated K times (two passes; attention ``K * Lc * (Lp + Lc)``, K copies of the
            prompt's keys/values). Both give the same result.
        trim: first cut the padding columns no row uses (prompt tokens, candidate slots, candidate tokens), then
            pad the outputs back to K. Buffers and codecs pad to fixed widths (so that sampling needs no host sync),
            which can triple the tokens of a pass; finding the used widths costs one small host sync, which also
            counts the real candidate tokens so that only those go through the LM head.
        lean: the memory-lean path (issue 15): LM head at real candidate tokens only (all ``B * K * Lc`` slots when
            ``trim=False``, since their count is then unknown without a sync), vocabulary log-softmax in chunks of
            ``logit_chunk`` rows forward and backward; seq2seq decodes the K candidates of a state as one packed
            sequence (cross-attention over the prompt once per state). ``False``: the previous path, kept as the
            memory-hungry baseline of ``scripts/bench_memory.py`` (``[B, K, Lc, V]`` float32 logits at once; seq2seq
            repeats the encoder output over the K candidates, ``[B * K, Lp, H]``). Same results either way.
        logit_chunk: rows per LM-head chunk in the lean path (default: 32M logits per chunk,
            :data:`LOGIT_CHUNK_ELEMENTS` / V rows).
        rows: [B] bool, the states to score (None: all). The model runs on those rows only (``trim=True``; with
            ``trim=False`` every row is scored and the others are zeroed); the others get the output of a state with
            no candidate: zero logp, hidden and prompt_hidden, no valid slot. The SAC update's target pass skips its
            terminal transitions this way (their bootstrap is multiplied by a zero discount).

    Returns:
        :class:`ScoreOutput` with logp [B, K], hidden [B, K, H], valid [B, K], prompt_hidden [B, H].
    """
    if method not in ("packed", "cache"):
        raise ValueError(f"score_candidates(method={method!r}): use 'packed' or 'cache'")
    if logit_chunk is not None and logit_chunk < 1:
        raise ValueError(f"score_candidates(logit_chunk={logit_chunk}): must be >= 1 row (or None for the default)")
    _check_inputs(prompt_ids, prompt_mask, cand_ids, cand_mask)
    kwargs: dict[str, Any] = {"length_norm": length_norm, "method": method, "lean": lean, "logit_chunk": logit_chunk}
    if rows is not None and rows.shape != prompt_ids.shape[:1]:
        raise ValueError(f"score_candidates: rows must be [B] bool with B = {prompt_ids.shape[0]}, got "
                         f"{tuple(rows.shape)}")
    if trim:
        return _trimmed(model, prompt_ids, prompt_mask, cand_ids, cand_mask, rows=rows, **kwargs)
    out = _score_shared(model, prompt_ids, prompt_mask, cand_ids, cand_mask, n_real=None, **kwargs)
    if rows is None:
        return out
    keep = rows.bool()
    return ScoreOutput(
        logp=torch.where(keep[:, None], out.logp, torch.zeros_like(out.logp)),
        hidden=torch.where(keep[:, None, None], out.hidden, torch.zeros_like(out.hidden)),
        valid=out.valid & keep[:, None],
        prompt_hidden=torch.where(keep[:, None], out.prompt_hidden, torch.zeros_like(out.prompt_hidden)),
    )


def score_candidates_naive(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    *,
    length_norm: bool = False,
) -> ScoreOutput:
    """Reference scorer: the prompt is repeated for every candidate and the model's own ``forward`` runs on
    ``B * K`` sequences ``[prompt, candidate]`` (cost ``K * Lp + sum Lc`` tokens per state).

    Same arguments and result as :func:`score_candidates`.
    """
    _check_inputs(prompt_ids, prompt_mask, cand_ids, cand_mask)
    prompt_mask = prompt_mask.bool()
    cand_mask = cand_mask.bool()
    prompt_ids = _sanitise(prompt_ids, prompt_mask)
    cand_ids = _sanitise(cand_ids, cand_mask)
    inner = unwrap(model)  # LoRA layers stay injected and active in the unwrapped model
    if _is_encoder_decoder(inner):
        return _score_seq2seq(inner, prompt_ids, prompt_mask, cand_ids, cand_mask, length_norm, shared=False)

    B, K, Lc = cand_ids.shape
    N = B * K
    device = prompt_ids.device
    plen = prompt_mask.sum(-1).repeat_interleave(K)  # [N]
    # Row n = prompt_b's real tokens immediately followed by candidate (b, k), right padded to Lp + Lc.
    seq = F.pad(prompt_ids.repeat_interleave(K, dim=0), (0, Lc))
    seq_mask = F.pad(prompt_mask.repeat_interleave(K, dim=0), (0, Lc))
    flat_ids = cand_ids.reshape(N, Lc)
    flat_mask = cand_mask.reshape(N, Lc)
    j = torch.arange(Lc, device=device)
    cand_pos = plen.unsqueeze(1) + j  # [N, Lc], always < L
    seq = seq.scatter(1, cand_pos, flat_ids)
    seq_mask = seq_mask.scatter(1, cand_pos, flat_mask)
    out = inner(input_ids=seq, attention_mask=seq_mask.long(), output_hidden_states=True, use_cache=False)
    logits = out.logits  # [N, L, V]
    pred_pos = (cand_pos - 1).clamp(min=0)
    logits_c = torch.gather(logits, 1, pred_pos.unsqueeze(-1).expand(N, Lc, logits.shape[-1]))
    tok_logp = _token_logp(logits_c, flat_ids, flat_mask).view(B, K, Lc)
    h = out.hidden_states[-1]  # [N, L, H]
    last_pos = plen + (flat_mask.sum(-1) - 1).clamp(min=0)
    last_hidden = torch.gather(h, 1, last_pos.view(N, 1, 1).expand(N, 1, h.shape[-1])).view(B, K, -1)
    prompt_last = (plen - 1).clamp(min=0).view(N, 1, 1).expand(N, 1, h.shape[-1])
    prompt_hidden = torch.gather(h, 1, prompt_last).view(B, K, -1)[:, 0]  # the first candidate's copy of the prompt
    return _finish(tok_logp, last_hidden, cand_mask, length_norm, prompt_hidden)
