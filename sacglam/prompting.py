"""Prompts as token ids: a template around a goal and an observation, assembled from separately tokenised pieces.

The template pieces (text before the goal, between goal and observation, after the observation) are tokenised once;
each goal, observation and candidate is tokenised on its own (cached by string). A prompt is then the concatenation
``[specials] + pre + goal + mid + obs + post`` done by index arithmetic on the device, so the replay buffer can swap
the goal of a stored transition (hindsight relabelling) without re-tokenising anything.

The pieces are cut and tokenised so that their concatenation equals the model's own tokenisation of the whole text
``prompt + " " + candidate`` (``PromptCodec``'s docstring says how, and where it can still differ): a pretrained model
must read its words in the form it was trained on. Acting and training build prompts with the same codec: the
collector calls ``PromptCodec.encode_prompts`` and the buffer calls ``PromptCodec.assemble`` / ``assemble_prompt`` on
the very same token ids.

This module imports torch only (tokenizers are used through their ``encode`` / ``apply_chat_template`` methods).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

ObsTruncation = Literal["left", "right", "error"]


@dataclass(frozen=True)
class PromptTemplate:
    """The text around the goal and the observation: ``pre + goal + mid + observation + post``.

    Attributes:
        pre: text before the goal.
        mid: text between the goal and the observation.
        post: text after the observation (where the action follows).
    """

    pre: str = "Goal: "
    mid: str = "\nObservation: "
    post: str = "\nAction:"

    @classmethod
    def from_format(cls, fmt: str) -> PromptTemplate:
        """Build a template from a format string holding ``{goal}`` then ``{obs}`` exactly once each.

        Args:
            fmt: e.g. ``"Goal: {goal}\\nObservation: {obs}\\nAction:"``.

        Raises:
            ValueError: the format lacks a field, repeats one, or puts ``{obs}`` before ``{goal}``.
        """
        if fmt.count("{goal}") != 1 or fmt.count("{obs}") != 1:
            raise ValueError(f"prompt format must contain '{{goal}}' and '{{obs}}' exactly once each, got {fmt!r}")
        pre, rest = fmt.split("{goal}")
        if "{obs}" not in rest:
            raise ValueError(f"prompt format must put '{{goal}}' before '{{obs}}', got {fmt!r}")
        mid, post = rest.split("{obs}")
        return cls(pre=pre, mid=mid, post=post)

    def render(self, goal: str, observation: str) -> str:
        """The prompt as text (for logs and debugging; the model sees ``PromptCodec`` token ids)."""
        return f"{self.pre}{goal}{self.mid}{observation}{self.post}"


@dataclass
class PromptPieces:
    """The template's token ids, as the buffer needs them to assemble prompts on its device.

    Attributes:
        prefix: [P] long, ``[bos?] + pre`` token ids.
        mid: [M] long, token ids between goal and observation.
        post: [Q] long, token ids after the observation.
        pad_id: id written after the end of each prompt.
    """

    prefix: torch.Tensor
    mid: torch.Tensor
    post: torch.Tensor
    pad_id: int

    def to(self, device: torch.device | str) -> PromptPieces:
        """A copy with the token tensors on ``device``."""
        return PromptPieces(self.prefix.to(device), self.mid.to(device), self.post.to(device), self.pad_id)

    def prompt_width(self, max_goal_tokens: int, max_obs_tokens: int) -> int:
        """Lp: the fixed prompt width that holds the longest goal and observation."""
        return int(self.prefix.numel() + max_goal_tokens + self.mid.numel() + max_obs_tokens + self.post.numel())


def assemble_prompt(
    pieces: PromptPieces,
    goal_ids: torch.Tensor,
    goal_len: torch.Tensor,
    obs_ids: torch.Tensor,
    obs_len: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``prefix + goal[:goal_len] + mid + obs[:obs_len] + post`` per row, right padded, on the device.

    The width is fixed (``Lp = P + Lg + M + Lo + Q``) rather than trimmed to the longest row, because finding the
    longest row would need a host-device synchronisation; the attention mask makes the padding inert.

    One gather does it: the sources are laid side by side as ``[prefix | goal | mid | obs | post]`` (width Lp) and
    output position p reads source ``p + (Lg - goal_len) [p past the goal] + (Lo - obs_len) [p past the obs]``,
    i.e. it skips the padding of the segments already passed. That is a handful of [B, Lp] ops and no Python loop.

    Args:
        pieces: the template's token ids, on the same device as the other tensors.
        goal_ids: [B, Lg] goal token ids (right padded); goal_len: [B].
        obs_ids: [B, Lo] observation token ids (right padded); obs_len: [B].

    Returns:
        prompt_ids: [B, Lp] long, right padded with ``pieces.pad_id``; prompt_mask: [B, Lp] bool.
    """
    B, Lg = goal_ids.shape
    Lo = obs_ids.shape[1]
    device = goal_ids.device
    n_pre, n_mid, n_post = pieces.prefix.numel(), pieces.mid.numel(), pieces.post.numel()
    Lp = n_pre + Lg + n_mid + Lo + n_post
    gl = goal_len.to(device=device, dtype=torch.long).unsqueeze(1)  # [B, 1]
    ol = obs_len.to(device=device, dtype=torch.long).unsqueeze(1)
    src = torch.cat([
        pieces.prefix.to(device).expand(B, -1), goal_ids.long(), pieces.mid.to(device).expand(B, -1),
        obs_ids.long(), pieces.post.to(device).expand(B, -1),
    ], dim=1)  # [B, Lp]
    p = torch.arange(Lp, device=device).unsqueeze(0)  # [1, Lp]
    past_goal = p >= n_pre + gl
    past_obs = p >= n_pre + gl + n_mid + ol
    idx = p + past_goal * (Lg - gl) + past_obs * (Lo - ol)
    mask = p < (n_pre + n_mid + n_post) + gl + ol
    ids = src.gather(1, idx.clamp(max=Lp - 1))
    return ids.masked_fill_(~mask, pieces.pad_id), mask



# Above this many entries ((Lg + 1) * (Lo + 1) * Lp) the assembler keeps two small index tables instead of a joint one.
JOINT_TABLE_MAX_ENTRIES = 1 << 22  # 32 MiB of int64


class PromptAssembler:
    """Assembles prompts with one gather through index tables precomputed for fixed widths (the buffer's fast path).

    ``assemble_prompt`` derives, for every output position, where it reads from with a dozen [B, Lp] integer ops per
    call. Those positions depend only on the goal length ``gl`` and the observation length ``ol``, so they are tabled
    once here. Each row's sources are laid side by side as ``[head | obs | post | pad]`` (width ``W = Lp + 1``), where
    the *head* ``[bos?] + pre + goal[:gl] + mid`` (width ``Hw = P + Lg + M``, right padded) is built once per goal
    (``heads``), and output position p reads source column

        max(head_index[gl, p], tail_index[gl + ol, p])

    ``head_index`` covers the head and the observation (p, then ``Hw + p - (P + gl + M)``); ``tail_index`` is -1 before
    the post piece starts (at ``P + M + gl + ol``) and points into post, then at the pad column, from there on. Past
    the post, tail >= head (``ol <= Lo``), so the maximum picks the right source everywhere; the mask is a table
    indexed by ``gl + ol``. When ``(Lg + 1) * (Lo + 1) * Lp <= JOINT_TABLE_MAX_ENTRIES`` the maximum is tabled too,
    for every (gl, ol) pair (``joint_index``, ``joint_mask``), and a call is one row lookup of the source columns, one
    of the mask and one gather.

    The result equals ``assemble_prompt`` on the same tokens (tested, both table layouts).

    Args:
        pieces: the template's token ids.
        max_goal_tokens: Lg, the goal width.
        max_obs_tokens: Lo, the observation width.
        device: where the tables live (default: the pieces' device).
    """

    def __init__(
        self, pieces: PromptPieces, max_goal_tokens: int, max_obs_tokens: int, device: torch.device | str | None = None
    ) -> None:
        dev = torch.device(device) if device is not None else pieces.prefix.device
        self.pieces = pieces.to(dev)
        P, M, Q = pieces.prefix.numel(), pieces.mid.numel(), pieces.post.numel()
        Lg, Lo = max_goal_tokens, max_obs_tokens
        self.max_goal_tokens, self.max_obs_tokens = Lg, Lo
        self.head_width = Hw = P + Lg + M
        self.prompt_width = Lp = Hw + Lo + Q
        self.source_width = W = Lp + 1  # [head | obs | post | pad]
        p = torch.arange(Lp)
        hl = P + M + torch.arange(Lg + 1).unsqueeze(1)  # [Lg + 1, 1] head length for each goal length
        self.head_index = torch.where(p < hl, p, Hw + p - hl).clamp(max=W - 1)  # [Lg + 1, Lp]
        end = P + M + torch.arange(Lg + Lo + 1).unsqueeze(1)  # [Lg + Lo + 1, 1] where post starts, per gl + ol
        self.tail_index = torch.where(p < end, -1, (Hw + Lo + p - end).clamp(max=W - 1))  # [Lg + Lo + 1, Lp]
        self.mask_table = p < end + Q  # [Lg + Lo + 1, Lp] bool
        self.joint_index: torch.Tensor | None = None  # [(Lg + 1) * (Lo + 1), Lp] long, row gl * (Lo + 1) + ol
        self.joint_mask: torch.Tensor | None = None  # [(Lg + 1) * (Lo + 1), Lp] bool
        if (Lg + 1) * (Lo + 1) * Lp <= JOINT_TABLE_MAX_ENTRIES:
            gl = torch.arange(Lg + 1).repeat_interleave(Lo + 1)
            s = gl + torch.arange(Lo + 1).repeat(Lg + 1)
            self.joint_index = torch.maximum(self.head_index[gl], self.tail_index[s]).to(dev)
            self.joint_mask = self.mask_table[s].to(dev)
        self.head_index, self.tail_index, self.mask_table = (x.to(dev) for x in (self.head_index, self.tail_index,
                                                                                  self.mask_table))
        self.tail_tokens = torch.cat([pieces.post, pieces.post.new_full((1,), pieces.pad_id)]).to(dev)  # [Q + 1]

    def heads(self, goal_ids: torch.Tensor, goal_len: torch.Tensor) -> torch.Tensor:
        """The heads ``[bos?] + pre + goal[:gl] + mid`` of goals, right padded with ``pad_id``.

        Args:
            goal_ids: [G, Lg] goal token ids (right padded); goal_len: [G].

        Returns:
            [G, Hw] long.
        """
        no_post = PromptPieces(self.pieces.prefix, self.pieces.mid, self.pieces.post[:0], self.pieces.pad_id)
        obs = goal_ids.new_zeros((goal_ids.shape[0], 0))
        return assemble_prompt(no_post, goal_ids, goal_len, obs, torch.zeros_like(goal_len))[0]

    def source(self, head: torch.Tensor, obs_ids: torch.Tensor) -> torch.Tensor:
        """Lay out the sources ``[head | obs | post | pad]`` of R x B prompts that share their heads.

        Args:
            head: [B, Hw] heads (``heads``); obs_ids: [R, B, Lo] observation ids, same dtype.

        Returns:
            [R, B, W] in that dtype.
        """
        R, B, Lo = obs_ids.shape
        src = obs_ids.new_empty((R, B, self.source_width))
        src[:, :, : self.head_width] = head
        src[:, :, self.head_width : self.head_width + Lo] = obs_ids
        src[:, :, self.head_width + Lo :] = self.tail_tokens
        return src

    def gather(
        self, src: torch.Tensor, goal_len: torch.Tensor, obs_len: torch.Tensor, dtype: torch.dtype = torch.long
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts from laid-out sources: one gather with the tabled source columns.

        Args:
            src: [R, B, W] from ``source`` (or written in place the same way); goal_len: [B] int32/int64;
                obs_len: [R, B] int16/int32/int64.
            dtype: of the ids returned (the replay buffer's batches take int32, ``sacglam.types.BATCH_ID_DTYPE``).

        Returns:
            prompt_ids: [R, B, Lp] ``dtype`` (long by default), right padded; prompt_mask: [R, B, Lp] bool.
        """
        R, B = obs_len.shape
        Lp = self.prompt_width
        if self.joint_index is not None and self.joint_mask is not None:
            key = (goal_len * (self.max_obs_tokens + 1) + obs_len).view(-1)  # [R * B]
            idx = self.joint_index.index_select(0, key).view(R, B, Lp)
            mask = self.joint_mask.index_select(0, key)
        else:
            s = (obs_len + goal_len).view(-1)  # promotes int16 lengths (an index needs int32/int64)
            idx = torch.maximum(self.head_index.index_select(0, goal_len),
                                self.tail_index.index_select(0, s).view(R, B, Lp))
            mask = self.mask_table.index_select(0, s)
        return src.gather(2, idx).to(dtype), mask.view(R, B, Lp)

    def assemble(
        self, head: torch.Tensor, goal_len: torch.Tensor, obs_ids: torch.Tensor, obs_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``source`` then ``gather``: R x B prompts [R, B, Lp] (long ids, bool mask) from shared heads [B, Hw]."""
        return self.gather(self.source(head, obs_ids), goal_len, obs_len)


def _lead_newlines(text: str) -> tuple[str, str]:
    """``text`` split into its leading run of newlines and the rest."""
    rest = text.lstrip("\r\n")
    return text[: len(text) - len(rest)], rest


def _trail_spaces(text: str) -> tuple[str, str]:
    """``text`` split into the rest and its trailing run of spaces."""
    rest = text.rstrip(" ")
    return rest, text[len(rest) :]


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer adds around a text by itself (``add_special_tokens=True``).

    Llama-2 SentencePiece tokenizers add ``<s>`` before, T5 adds ``</s>`` after, GPT-2, Qwen2 and SmolLM2 add nothing.

    Returns:
        (before, after) lists of ids.
    """
    probe = "a b"
    plain = list(tokenizer.encode(probe, add_special_tokens=False))
    full = list(tokenizer.encode(probe, add_special_tokens=True))
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError(f"{type(tokenizer).__name__} encodes {probe!r} differently with and without special tokens "
                     f"({full} vs {plain}); cannot tell which ids are special")


def chat_format(tokenizer: Any, template: str, system: str | None = None) -> str:
    """A prompt format wrapped in the tokenizer's own chat template: ``template`` is the user turn, and the
    generation prompt (the opening of the assistant turn) ends the prompt, so candidates are scored as the answer.

    Args:
        tokenizer: a ``transformers`` tokenizer with a ``chat_template``.
        template: the user message, holding ``{goal}`` then ``{obs}``.
        system: a system message; None keeps the template's default (SmolLM2 adds its own).

    Returns:
        A format string for :meth:`PromptTemplate.from_format`.

    Raises:
        ValueError: the tokenizer has no chat template, or the template mangles the placeholders.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt.chat=true but the {type(tokenizer).__name__} tokenizer has no chat_template; "
                         "use prompt.chat=false for this model")
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": template})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str) or text.count("{goal}") != 1 or text.count("{obs}") != 1:
        raise ValueError(f"the chat template did not keep {{goal}} and {{obs}} of prompt.template: {text!r}")
    return text


class PromptCodec:
    """Tokenises goals, observations and candidates as pieces whose concatenation is the model's own tokenisation.

    The prompt text is ``pre + goal + mid + obs [+ actions] + post`` and a causal model scores a candidate as the
    continuation ``prompt + action_sep + candidate`` (a seq2seq model scores it as its own decoder text). Tokenising
    pieces separately must give the ids the tokenizer gives the whole text, or a pretrained model sees its words in a
    form it never saw in training (byte-level BPE glues a leading space to the next word: ``' Go'``, not ``'Go'``;
    SentencePiece marks it with ``'▁'``; docs/design/ALGORITHM.md section 1). So the pieces are cut where every
    tokenizer
    family here splits anyway, and each piece is tokenised in its context:

    - whitespace that precedes a variable piece moves into it (``"Goal: "`` + ``"Grasp"`` is cut as ``"Goal:"`` +
      ``" Grasp"``), and newlines that follow one move into it (``"...apple."`` + ``"\\nAction:"`` as
      ``"...apple.\\n"`` + ``"Action:"``: Qwen2 and Llama-3 pre-tokenizers glue punctuation to the newlines after
      it). A boundary is then "non-space | space" or "newline | non-space", where GPT-2, Qwen2/Llama-3, SentencePiece
      (Metaspace) and whitespace pre-tokenizers all split, whatever the goal or observation holds.
    - each variable piece is tokenised between the template text on its left and right, and the template's ids are
      cut off (``encode(L + piece + R)`` minus L's and R's ids; :meth:`_cut`). That gives SentencePiece's word-start
      marks and byte-level spaces exactly as in the full text. If no token boundary falls at either end (a merge
      across a cut, e.g. a template that glues the observation to punctuation without a space), the piece is still
      used and the string is counted in ``unfaithful_count``.
    - special tokens: those the tokenizer itself adds (``prefix_ids``: BOS of Llama-2 or of the tiny model;
      ``prompt_suffix``: T5's ``</s>`` after the encoder text), none in chat mode (the chat template holds them).

    The template's ids (``pieces``) are fixed; goal, observation and candidate ids are cached by string; a prompt is
    assembled by index arithmetic on the device (:func:`assemble_prompt`), so the replay buffer swaps goals without
    re-tokenising anything and acting and training see the same ids. Where exactly this can still differ from the
    tokenizer on the whole text (tested per family in tests/test_tokenisation.py): truncated observations (the text
    is cut, the ids are cut), and a goal or observation whose first or last characters merge with the template's
    (counted).

    Args:
        encode: text -> token ids without special tokens, e.g. ``lambda s: tok.encode(s, add_special_tokens=False)``.
        pad_id: padding id.
        template: the text around goal and observation.
        max_goal_tokens: Lg, the widest goal piece in tokens (longer is an error: goals are short and must stay
            whole). The piece holds the goal, its leading space and the newlines after it.
        max_obs_tokens: Lo, the observation width (the observation with its leading space, the action list when
            listed and the newlines after it); longer ones are cut per ``obs_truncation``.
        max_cands: K, the most candidate actions per state (more is an error).
        max_cand_tokens: Lc, the longest candidate in tokens (longer is an error: a cut action is another action).
        bos_id: prepended to every prompt when not None (before ``prefix_ids``).
        obs_truncation: ``"left"`` keeps the observation's last tokens, ``"right"`` its first, ``"error"`` raises.
        cache_size: strings kept per LRU cache (goals, observations, candidates each).
        prefix_ids: special ids before every prompt (the tokenizer's own, see :func:`special_tokens_around`).
        prompt_suffix: special ids after every prompt (seq2seq encoders: T5's ``</s>``).
        action_sep: text between the prompt and a candidate (``" "``; ``""`` after a chat generation prompt).
        cands_in_context: True (causal models): a candidate is tokenised as the continuation of the prompt. False
            (seq2seq): as a text of its own, as the decoder's target is.
        actions_format: when set, the state's candidate actions are listed after the observation with this format
            holding ``{actions}`` (GLAM's "Possible actions: ..."), joined by ``actions_joiner``.
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        *,
        pad_id: int,
        template: PromptTemplate | None = None,
        max_goal_tokens: int,
        max_obs_tokens: int,
        max_cands: int,
        max_cand_tokens: int,
        bos_id: int | None = None,
        obs_truncation: ObsTruncation = "left",
        cache_size: int = 65536,
        prefix_ids: Sequence[int] = (),
        prompt_suffix: Sequence[int] = (),
        action_sep: str = " ",
        cands_in_context: bool = True,
        actions_format: str | None = None,
        actions_joiner: str = ", ",
    ) -> None:
        if obs_truncation not in ("left", "right", "error"):
            raise ValueError(f"obs_truncation must be 'left', 'right' or 'error', got {obs_truncation!r}")
        if actions_format is not None and actions_format.count("{actions}") != 1:
            raise ValueError(f"prompt.actions_format must hold '{{actions}}' exactly once, got {actions_format!r}")
        self.encode = encode
        self.pad_id = pad_id
        self.template = t = template if template is not None else PromptTemplate()
        self.max_goal_tokens = max_goal_tokens
        self.max_obs_tokens = max_obs_tokens
        self.max_cands = max_cands
        self.max_cand_tokens = max_cand_tokens
        self.bos_id = bos_id
        self.obs_truncation: ObsTruncation = obs_truncation
        self.cache_size = cache_size
        self.action_sep = action_sep
        self.cands_in_context = cands_in_context
        self.actions_format = actions_format
        self.actions_joiner = actions_joiner
        self.truncated_count = 0  # observations cut so far (a metric: a high count means Lo is too small)
        self.unfaithful_count = 0  # strings whose piece ids differ from the tokenizer's on the whole text
        self._cache: dict[str, OrderedDict[str, list[int]]] = {"goal": OrderedDict(), "obs": OrderedDict(),
                                                               "cand": OrderedDict()}
        self._fixed: dict[str, list[int]] = {}  # ids of template texts used as context
        # Cut the template where tokenizers split: spaces before a variable piece and newlines after one move into it.
        pre_fixed, goal_lead = _trail_spaces(t.pre)
        self._mid_nl, rest = _lead_newlines(t.mid)
        mid_fixed, obs_lead = _trail_spaces(rest)
        self._post_nl, rest = _lead_newlines(t.post)
        post_fixed, cand_lead = _trail_spaces(rest)
        self._lead = {"goal": goal_lead, "obs": obs_lead, "cand": cand_lead + action_sep if cands_in_context else ""}
        self._tail = {"goal": self._mid_nl, "obs": self._post_nl, "cand": ""}
        mid_ids = self._after("x" + self._mid_nl, mid_fixed)
        post_ids = self._after("x" + self._post_nl, post_fixed)
        # (left text, right text, the right text's ids) around each variable piece.
        left = {"goal": pre_fixed, "obs": mid_fixed or "x" + self._mid_nl,
                "cand": (post_fixed or "x" + self._post_nl) if cands_in_context else ""}
        right = {"goal": (mid_fixed, mid_ids), "obs": (post_fixed, post_ids), "cand": ("", [])}
        self._context = {k: (left[k], *right[k]) for k in left}
        for text in left.values():  # their ids are looked up for every new string
            if text:
                self._fixed_ids(text)
        prefix = ([bos_id] if bos_id is not None else []) + list(prefix_ids)
        self.pieces = PromptPieces(
            prefix=torch.tensor(prefix + (self._fixed_ids(pre_fixed) if pre_fixed else []), dtype=torch.long),
            mid=torch.tensor(mid_ids, dtype=torch.long),
            post=torch.tensor(post_ids + list(prompt_suffix), dtype=torch.long),
            pad_id=pad_id,
        )

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        *,
        template: str,
        seq2seq: bool = False,
        chat: bool = False,
        system: str | None = None,
        list_actions: bool = False,
        actions_format: str = "\nPossible actions: {actions}",
        action_sep: str | None = None,
        **limits: Any,
    ) -> PromptCodec:
        """The codec of a ``transformers`` tokenizer, faithful to how the model reads text.

        Args:
            tokenizer: the model's tokenizer (any family).
            template: the prompt format with ``{goal}`` then ``{obs}`` (in chat mode: the user message).
            seq2seq: the model is an encoder-decoder (T5): the prompt gets the tokenizer's trailing specials
                (``</s>``) and candidates are tokenised as texts of their own (the decoder's targets).
            chat: wrap the prompt in the tokenizer's chat template (:func:`chat_format`); candidates are then the
                assistant's answer (``action_sep`` defaults to ``""``, right after the generation prompt).
            system: the chat system message (None: the template's default).
            list_actions: list the state's candidate actions after the observation, with ``actions_format``.
            action_sep: text between prompt and candidate; None: ``" "``, or ``""`` in chat mode.
            **limits: ``max_goal_tokens``, ``max_obs_tokens``, ``max_cands``, ``max_cand_tokens``, ``obs_truncation``.
        """
        fmt = chat_format(tokenizer, template, system) if chat else template
        before, after = ([], []) if chat else special_tokens_around(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            pad_id=pad_id,
            template=PromptTemplate.from_format(fmt),
            prefix_ids=before,
            prompt_suffix=after if seq2seq else (),
            action_sep=action_sep if action_sep is not None else ("" if chat else " "),
            cands_in_context=not seq2seq,
            actions_format=actions_format if list_actions else None,
            **limits,
        )

    @property
    def prompt_width(self) -> int:
        """Lp, the fixed width of every assembled prompt."""
        return self.pieces.prompt_width(self.max_goal_tokens, self.max_obs_tokens)

    def _cut(self, left: str, text: str, right: str = "", right_ids: Sequence[int] = ()) -> list[int] | None:
        """Ids of ``text`` as the tokenizer gives them in ``left + text + right``, or None when no token boundary
        falls at both ends of ``text`` there.

        The left end is checked two ways, since either can be fooled: ``encode(left)`` is a prefix of the whole (it is
        not when ``left`` ends in a whitespace run that the GPT-2 regex splits differently at the end of a string), or
        ``encode(text + right)`` is a suffix of it (it is not when SentencePiece marks ``text``'s first word
        differently at the start of a string). Equal ids decode to equal text, so either match is a real boundary.
        """
        n_r = len(right_ids)
        full = list(self.encode(left + text + right))
        if n_r and full[len(full) - n_r :] != list(right_ids):
            return None
        body = full[: len(full) - n_r]
        if not left:
            return body
        head = self._fixed_ids(left)
        if body[: len(head)] == head:
            return body[len(head) :]
        own = list(self.encode(text + right))
        if n_r and own[len(own) - n_r :] != list(right_ids):
            return None
        own = own[: len(own) - n_r]
        return own if len(body) > len(own) and body[len(body) - len(own) :] == own else None

    def _fixed_ids(self, text: str) -> list[int]:
        ids = self._fixed.get(text)
        if ids is None:
            ids = self._fixed[text] = list(self.encode(text))
        return ids

    def _after(self, context: str, text: str) -> list[int]:
        """Ids of the template text ``text`` tokenised after ``context`` (counted in ``unfaithful_count`` if no
        token boundary falls between them)."""
        if not text:
            return []
        ids = self._cut(context, text)
        if ids is None:
            self.unfaithful_count += 1
            ids = list(self.encode(text))
        return ids

    def _piece(self, kind: str, text: str) -> list[int]:
        """Ids of a goal, observation or candidate piece in its template context (see the class docstring)."""
        left, right, right_ids = self._context[kind]
        ids = self._cut(left, text, right, right_ids)
        if ids is None:
            self.unfaithful_count += 1
            ids = self._cut(left, text) if left else None
        return ids if ids is not None else list(self.encode(text))

    def _cached(self, kind: str, text: str) -> list[int]:
        cache = self._cache[kind]
        ids = cache.get(text)
        if ids is None:
            ids = self._piece(kind, self._lead[kind] + text + self._tail[kind])
            cache[text] = ids
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(text)
        return ids

    def piece_length(self, kind: str, text: str) -> int:
        """Tokens of ``text`` as the prompt holds it (``kind``: ``goal``, ``obs`` or ``cand``), before any limit or
        cut: what ``max_goal_tokens``, ``max_obs_tokens`` and ``max_cand_tokens`` are compared with (cached).

        Raises:
            ValueError: an unknown ``kind``.
        """
        if kind not in self._cache:
            raise ValueError(f"kind must be 'goal', 'obs' or 'cand', got {kind!r}")
        return len(self._cached(kind, text))

    def observation_text(self, observation: str, candidates: Sequence[str] | None = None) -> str:
        """The observation as the prompt shows it: with the candidate actions listed when ``actions_format`` is set.

        Raises:
            ValueError: actions are listed but ``candidates`` is None.
        """
        if self.actions_format is None:
            return observation
        if candidates is None:
            raise ValueError("prompt.list_actions is on: pass the state's candidate actions with its observation")
        return observation + self.actions_format.replace("{actions}", self.actions_joiner.join(candidates))

    def render(self, goal: str, observation: str, candidates: Sequence[str] | None = None) -> str:
        """The prompt as text: what the pieces' ids are the tokenisation of (a causal model then reads
        ``action_sep + candidate``)."""
        return self.template.render(goal, self.observation_text(observation, candidates))

    def goal_tokens(self, goal: str) -> list[int]:
        """Token ids of ``goal``'s piece (cached).

        Raises:
            ValueError: the goal is longer than ``max_goal_tokens`` (names the value needed).
        """
        ids = self._cached("goal", goal)
        if len(ids) > self.max_goal_tokens:
            raise ValueError(
                f"goal {goal!r} has {len(ids)} tokens > max_goal_tokens={self.max_goal_tokens}; "
                f"set max_goal_tokens >= {len(ids)}"
            )
        return ids

    def _obs_tokens(self, observation: str) -> list[int]:
        ids = self._cached("obs", observation)
        if len(ids) <= self.max_obs_tokens:
            return ids
        if self.obs_truncation == "error":
            raise ValueError(
                f"observation has {len(ids)} tokens > max_obs_tokens={self.max_obs_tokens}; set max_obs_tokens >= "
                f"{len(ids)} or obs_truncation='left'/'right'. Observation starts: {observation[:80]!r}"
            )
        self.truncated_count += 1
        # Left truncation keeps the end of the observation, where text envs put the newest information.
        return ids[-self.max_obs_tokens :] if self.obs_truncation == "left" else ids[: self.max_obs_tokens]

    def _padded(self, rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> ids [N, width] long (right padded with pad_id) and lengths [N] long, on CPU."""
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, t in enumerate(rows):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return ids, torch.tensor([len(t) for t in rows], dtype=torch.long)

    def encode_goals(self, goals: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Goal token ids [N, Lg] long (right padded) and lengths [N] long, on CPU."""
        return self._padded([self.goal_tokens(g) for g in goals], self.max_goal_tokens)

    def encode_observations(
        self, observations: Sequence[str], candidates: Sequence[Sequence[str]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Observation token ids [N, Lo] long (right padded, Lo = max_obs_tokens) and lengths [N] long, on CPU.

        Args:
            observations: N texts.
            candidates: the N states' candidate actions (needed when actions are listed in the prompt).
        """
        if candidates is not None and len(candidates) != len(observations):
            raise ValueError(f"got {len(observations)} observations but {len(candidates)} candidate lists")
        texts = [self.observation_text(o, candidates[i] if candidates is not None else None)
                 for i, o in enumerate(observations)]
        return self._padded([self._obs_tokens(o) for o in texts], self.max_obs_tokens)

    def encode_candidates(self, candidates: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate token ids [N, K, Lc] long (K = max_cands, Lc = max_cand_tokens) and lengths [N, K] (0 = absent).

        Raises:
            ValueError: a state has more than ``max_cands`` candidates, or a candidate more than ``max_cand_tokens``
                tokens (the message names the limit and the value needed).
        """
        N, K, Lc = len(candidates), self.max_cands, self.max_cand_tokens
        ids = torch.full((N, K, Lc), self.pad_id, dtype=torch.long)
        lens = torch.zeros(N, K, dtype=torch.long)
        for i, cands in enumerate(candidates):
            if len(cands) > K:
                raise ValueError(f"state {i} has {len(cands)} candidate actions > max_cands={K}; "
                                 f"set max_cands >= {len(cands)}")
            for k, c in enumerate(cands):
                t = self._cached("cand", c)
                if len(t) > Lc:
                    raise ValueError(f"candidate action {c!r} has {len(t)} tokens > max_cand_tokens={Lc}; "
                                     f"set max_cand_tokens >= {len(t)}")
                ids[i, k, : len(t)] = torch.tensor(t, dtype=torch.long)
                lens[i, k] = len(t)
        return ids, lens

    def candidate_tensors(self, candidates: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates ready for the model: cand_ids [N, K, Lc] long and cand_mask [N, K, Lc] bool, on CPU."""
        ids, lens = self.encode_candidates(candidates)
        mask = torch.arange(self.max_cand_tokens).view(1, 1, -1) < lens.unsqueeze(-1)
        return ids, mask

    def assemble(
        self, goal_ids: torch.Tensor, goal_len: torch.Tensor, obs_ids: torch.Tensor, obs_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts from token ids, on the tensors' device (see ``assemble_prompt``).

        Args:
            goal_ids: [B, Lg]; goal_len: [B]; obs_ids: [B, Lo]; obs_len: [B].

        Returns:
            prompt_ids: [B, Lp] long, right padded; prompt_mask: [B, Lp] bool.
        """
        return assemble_prompt(self.pieces, goal_ids, goal_len, obs_ids, obs_len)

    def encode_prompts(
        self,
        goals: Sequence[str],
        observations: Sequence[str],
        candidates: Sequence[Sequence[str]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts of N (goal, observation) pairs: the same tokens the buffer assembles. [N, Lp] long and bool.

        ``candidates`` (the N states' actions) are needed when the prompt lists them (``actions_format``)."""
        if len(goals) != len(observations):
            raise ValueError(f"encode_prompts got {len(goals)} goals but {len(observations)} observations")
        g, gl = self.encode_goals(goals)
        o, ol = self.encode_observations(observations, candidates)
        return self.assemble(g, gl, o, ol)
