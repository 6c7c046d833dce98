"""The replay buffer's goal table: each distinct goal's tokens once, its step limit, its achievement count, and the
prompt head ``[bos?] + pre + goal + mid`` the samplers copy into every prompt of that goal.

Stored transitions refer to goals by id (row of this table); relabelling swaps ids, never tokens. This module imports
torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sacglam.prompting import PromptAssembler
from sacglam.replay.config import BufferConfig
from sacglam.replay.storage import TOKEN_DTYPES

Alloc = Callable[..., torch.Tensor]  # ReplayStorage.alloc: (*shape, dtype=, fill=) -> a new filled tensor


class GoalTable:
    """Goal ids <-> tokens, with per-goal step limits, achievement counts and prompt heads.

    Args:
        cfg: the buffer's options (``max_goals``, ``max_goal_tokens``, ``token_dtype``).
        alloc: allocates a filled tensor on the buffer's device (``ReplayStorage.alloc``).
        pad_id: token id of the padding positions.
        token_max: the largest id the token dtype holds.
        asm: the prompt assembler whose heads are kept per goal.
        head_dtype: dtype of ``heads`` (the token dtype, or int32 when template ids do not fit it).
        wide_heads: also keep ``heads32``, the heads as int32 (what the native sampler copies into the batch).
    """

    def __init__(self, cfg: BufferConfig, alloc: Alloc, *, pad_id: int, token_max: int, asm: PromptAssembler,
                 head_dtype: torch.dtype, wide_heads: bool) -> None:
        self.cfg = cfg
        self.token_max = token_max
        self.asm = asm
        self.head_dtype = head_dtype
        tdt = TOKEN_DTYPES[cfg.token_dtype]
        self.goal_tokens = alloc(cfg.max_goals, cfg.max_goal_tokens, dtype=tdt, fill=pad_id)
        self.goal_len = alloc(cfg.max_goals, dtype=torch.int16)
        self.goal_limit = alloc(cfg.max_goals, dtype=torch.int64)
        # Achievements per goal over the whole run (counted with a rarity option only).
        self.goal_count = alloc(cfg.max_goals, dtype=torch.int64)
        self.ids: dict[tuple[int, ...], int] = {}
        self.max_limit = 1  # host copy of max(goal_limit): how far back an achievement marks rows (rare_goal)
        self.heads = alloc(cfg.max_goals, asm.head_width, dtype=head_dtype)  # [bos?] + pre + goal + mid
        self.goal_len32 = alloc(cfg.max_goals, dtype=torch.int32)
        self.heads32 = alloc(cfg.max_goals, asm.head_width, dtype=torch.int32) if wide_heads else None

    @property
    def n_goals(self) -> int:
        """Goals registered so far."""
        return len(self.ids)

    def register(self, tokens: list[int] | tuple[int, ...] | torch.Tensor, limit: int = 0) -> int:
        """Store a goal's token ids once and return its id (the same id for the same tokens).

        Args:
            tokens: the goal's token ids (no padding).
            limit: the goal's step limit (0 = unknown), reported as ``Batch.goal_limit``.

        Raises:
            ValueError: the goal is wider than ``max_goal_tokens`` or the table already holds ``max_goals`` goals.
        """
        key = tuple(int(x) for x in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens))
        if key and max(key) > self.token_max:
            raise ValueError(f"goal token id {max(key)} exceeds token_dtype={self.cfg.token_dtype}'s maximum "
                             f"{self.token_max}; set buffer token_dtype='int32'")
        gid = self.ids.get(key)
        self.max_limit = max(self.max_limit, limit)
        if gid is not None:
            if limit:
                self.goal_limit[gid] = limit
            return gid
        if len(key) > self.cfg.max_goal_tokens:
            raise ValueError(f"goal has {len(key)} tokens > max_goal_tokens={self.cfg.max_goal_tokens}; "
                             f"set buffer max_goal_tokens >= {len(key)}")
        gid = len(self.ids)
        if gid >= self.cfg.max_goals:
            raise ValueError(f"goal table overflow: {gid} goals already registered = max_goals; "
                             f"set buffer max_goals larger (e.g. {2 * self.cfg.max_goals})")
        self.goal_tokens[gid, : len(key)] = torch.tensor(key, dtype=self.goal_tokens.dtype)
        self.goal_len[gid] = len(key)
        self.goal_limit[gid] = limit
        self.set_heads(slice(gid, gid + 1))
        self.ids[key] = gid
        return gid

    def set_heads(self, g: slice) -> None:
        """Prompt heads and int32 lengths of goal table rows ``g`` (from their tokens and lengths)."""
        heads = self.asm.heads(self.goal_tokens[g].long(), self.goal_len[g].long())
        self.heads[g] = heads.to(self.head_dtype)
        self.goal_len32[g] = self.goal_len[g].to(torch.int32)
        if self.heads32 is not None:
            self.heads32[g] = heads.to(torch.int32)

    def keys(self) -> list[list[int]]:
        """The goals' token ids in id order (what a state saves)."""
        return [list(k) for k in self.ids]  # dicts keep insertion order

    def load(self, keys: list[list[int]]) -> None:
        """Restore the id lookup and the host copy of the largest step limit after the tensors were loaded (the heads
        are rebuilt with ``set_heads``)."""
        self.ids = {tuple(k): i for i, k in enumerate(keys)}
        self.max_limit = max(1, int(self.goal_limit.max()))


__all__ = ["GoalTable"]
