"""Prompts as token ids: a template around a goal and an observation, assembled from separately tokenised pieces.

The template pieces (text before the goal, between goal and observation, after the observation) are tokenised once;
each goal, observation and candidate is tokenised on its own (cached by string). A prompt is then the concatenation
``[bos?] + pre + goal + mid + obs + post`` done by index arithmetic on the device, so the replay buffer can swap the
goal of a stored transition (hindsight relabelling) without re-tokenising anything.

Tokenising the pieces separately can differ slightly from tokenising the whole prompt string with a BPE tokenizer (a
merge across a piece boundary is never formed). That is harmless as long as acting and training build prompts with the
same codec, which they do: the collector calls ``PromptCodec.encode_prompts`` and the buffer calls
``PromptCodec.assemble`` / ``assemble_prompt`` on the very same token ids.

This module imports torch only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

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
        self, src: torch.Tensor, goal_len: torch.Tensor, obs_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts from laid-out sources: one gather with the tabled source columns.

        Args:
            src: [R, B, W] from ``source`` (or written in place the same way); goal_len: [B] int32/int64;
                obs_len: [R, B] int16/int32/int64.

        Returns:
            prompt_ids: [R, B, Lp] long, right padded; prompt_mask: [R, B, Lp] bool.
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
        return src.gather(2, idx).long(), mask.view(R, B, Lp)

    def assemble(
        self, head: torch.Tensor, goal_len: torch.Tensor, obs_ids: torch.Tensor, obs_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``source`` then ``gather``: R x B prompts [R, B, Lp] (long ids, bool mask) from shared heads [B, Hw]."""
        return self.gather(self.source(head, obs_ids), goal_len, obs_len)


class PromptCodec:
    """Tokenises goals, observations and candidates separately and assembles prompts from token ids.

    Args:
        encode: text -> token ids (no special tokens), e.g. ``lambda s: tok(s, add_special_tokens=False).input_ids``.
        pad_id: padding id.
        template: the text around goal and observation.
        max_goal_tokens: Lg, the longest goal in tokens (longer is an error: goals are short and must stay whole).
        max_obs_tokens: Lo, the observation width; longer ones are cut per ``obs_truncation``.
        max_cands: K, the most candidate actions per state (more is an error).
        max_cand_tokens: Lc, the longest candidate in tokens (longer is an error: a cut action is another action).
        bos_id: prepended to every prompt when not None.
        obs_truncation: ``"left"`` keeps the observation's last tokens, ``"right"`` its first, ``"error"`` raises.
        cache_size: strings kept per LRU cache (goals, observations, candidates each).
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
    ) -> None:
        if obs_truncation not in ("left", "right", "error"):
            raise ValueError(f"obs_truncation must be 'left', 'right' or 'error', got {obs_truncation!r}")
        self.encode = encode
        self.pad_id = pad_id
        self.template = template if template is not None else PromptTemplate()
        self.max_goal_tokens = max_goal_tokens
        self.max_obs_tokens = max_obs_tokens
        self.max_cands = max_cands
        self.max_cand_tokens = max_cand_tokens
        self.bos_id = bos_id
        self.obs_truncation: ObsTruncation = obs_truncation
        self.cache_size = cache_size
        self.truncated_count = 0  # observations cut so far (a metric: a high count means Lo is too small)
        self._cache: dict[str, OrderedDict[str, list[int]]] = {"goal": OrderedDict(), "obs": OrderedDict(),
                                                               "cand": OrderedDict()}
        prefix = ([bos_id] if bos_id is not None else []) + list(encode(self.template.pre))
        self.pieces = PromptPieces(
            prefix=torch.tensor(prefix, dtype=torch.long),
            mid=torch.tensor(list(encode(self.template.mid)), dtype=torch.long),
            post=torch.tensor(list(encode(self.template.post)), dtype=torch.long),
            pad_id=pad_id,
        )

    @property
    def prompt_width(self) -> int:
        """Lp, the fixed width of every assembled prompt."""
        return self.pieces.prompt_width(self.max_goal_tokens, self.max_obs_tokens)

    def _cached(self, kind: str, text: str) -> list[int]:
        cache = self._cache[kind]
        ids = cache.get(text)
        if ids is None:
            ids = list(self.encode(text))
            cache[text] = ids
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(text)
        return ids

    def goal_tokens(self, goal: str) -> list[int]:
        """Token ids of ``goal`` (cached).

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

    def encode_observations(self, observations: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Observation token ids [N, Lo] long (right padded, Lo = max_obs_tokens) and lengths [N] long, on CPU."""
        return self._padded([self._obs_tokens(o) for o in observations], self.max_obs_tokens)

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

    def encode_prompts(self, goals: Sequence[str], observations: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts of N (goal, observation) pairs: the same tokens the buffer assembles. [N, Lp] long and bool."""
        if len(goals) != len(observations):
            raise ValueError(f"encode_prompts got {len(goals)} goals but {len(observations)} observations")
        g, gl = self.encode_goals(goals)
        o, ol = self.encode_observations(observations)
        return self.assemble(g, gl, o, ol)
