"""PromptCodec tests against a tiny word-level tokenizer written here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sacglam.prompting import PromptCodec, PromptTemplate, assemble_prompt

torch.set_num_threads(1)


class WordTokenizer:
    """Word-level: each whitespace-separated word gets the next id (0 = pad, 1 = bos). Counts encode calls."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str) -> list[int]:
        self.calls += 1
        return [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.split()]


def make_codec(**kw: object) -> tuple[PromptCodec, WordTokenizer]:
    tok = WordTokenizer()
    args: dict = dict(pad_id=0, template=PromptTemplate.from_format("Goal: {goal} Obs: {obs} Act:"),
                      max_goal_tokens=3, max_obs_tokens=4, max_cands=3, max_cand_tokens=2)
    args.update(kw)
    return PromptCodec(tok, **args), tok


def test_template_from_format() -> None:
    t = PromptTemplate.from_format("Goal: {goal}\nObservation: {obs}\nAction:")
    assert (t.pre, t.mid, t.post) == ("Goal: ", "\nObservation: ", "\nAction:")
    assert t.render("go", "room") == "Goal: go\nObservation: room\nAction:"
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate.from_format("{goal} {goal} {obs}")
    with pytest.raises(ValueError, match="before"):
        PromptTemplate.from_format("{obs} {goal}")


def test_encode_prompts_is_the_concatenation_of_pieces() -> None:
    codec, tok = make_codec(bos_id=1)
    ids, mask = codec.encode_prompts(["grasp red ball", "go"], ["you see a door", "dark"])
    v = tok.vocab
    row0 = [1, v["Goal:"], v["grasp"], v["red"], v["ball"], v["Obs:"], v["you"], v["see"], v["a"], v["door"],
            v["Act:"]]
    row1 = [1, v["Goal:"], v["go"], v["Obs:"], v["dark"], v["Act:"]]
    Lp = 1 + 1 + 3 + 1 + 4 + 1  # bos, pre, Lg, mid, Lo, post
    assert codec.prompt_width == Lp and ids.shape == (2, Lp) and ids.dtype == torch.long
    assert ids[0].tolist() == row0 + [0] * (Lp - len(row0))
    assert ids[1].tolist() == row1 + [0] * (Lp - len(row1))
    assert mask.sum(1).tolist() == [len(row0), len(row1)] and mask.dtype == torch.bool
    assert mask[1].tolist() == [True] * len(row1) + [False] * (Lp - len(row1))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=6))
def test_assemble_matches_python_concatenation(lens: list[tuple[int, int]]) -> None:
    codec, _ = make_codec(max_goal_tokens=3, max_obs_tokens=5)
    B = len(lens)
    g = torch.randint(10, 99, (B, 3))
    o = torch.randint(100, 999, (B, 5))
    gl = torch.tensor([a for a, _ in lens])
    ol = torch.tensor([b for _, b in lens])
    ids, mask = codec.assemble(g, gl, o, ol)
    pre, mid, post = codec.pieces.prefix.tolist(), codec.pieces.mid.tolist(), codec.pieces.post.tolist()
    for i, (a, b) in enumerate(lens):
        want = pre + g[i, :a].tolist() + mid + o[i, :b].tolist() + post
        assert ids[i].tolist() == want + [0] * (ids.shape[1] - len(want))
        assert int(mask[i].sum()) == len(want) and bool(mask[i, : len(want)].all())


def test_observation_truncation_modes_and_count() -> None:
    codec, tok = make_codec(obs_truncation="left")
    ids, lens = codec.encode_observations(["a b c d e f", "x"])
    v = tok.vocab
    assert ids[0].tolist() == [v["c"], v["d"], v["e"], v["f"]] and lens.tolist() == [4, 1]
    assert codec.truncated_count == 1
    codec, tok = make_codec(obs_truncation="right")
    ids, _ = codec.encode_observations(["a b c d e f"])
    assert ids[0].tolist() == [tok.vocab[w] for w in "abcd"]
    codec, _ = make_codec(obs_truncation="error")
    with pytest.raises(ValueError, match="6 tokens > max_obs_tokens=4; set max_obs_tokens >= 6"):
        codec.encode_observations(["a b c d e f"])


def test_candidates_and_limits() -> None:
    codec, tok = make_codec()
    ids, mask = codec.candidate_tensors([["go north", "take"], ["drop"]])
    v = tok.vocab
    assert ids.shape == (2, 3, 2)
    assert ids[0].tolist() == [[v["go"], v["north"]], [v["take"], 0], [0, 0]]
    assert mask[1].tolist() == [[True, False], [False, False], [False, False]]
    with pytest.raises(ValueError, match="max_cands >= 4"):
        codec.encode_candidates([["a", "b", "c", "d"]])
    with pytest.raises(ValueError, match="max_cand_tokens >= 3"):
        codec.encode_candidates([["a b c"]])
    with pytest.raises(ValueError, match="max_goal_tokens >= 4"):
        codec.goal_tokens("one two three four")


def test_cache_avoids_retokenising_and_is_bounded() -> None:
    codec, tok = make_codec(cache_size=2)
    base = tok.calls
    codec.goal_tokens("go")
    codec.goal_tokens("go")
    assert tok.calls == base + 1
    codec.goal_tokens("a")
    codec.goal_tokens("b")  # evicts "go" (least recently used)
    codec.goal_tokens("go")
    assert tok.calls == base + 4 and len(codec._cache["goal"]) == 2


def test_assemble_runs_on_tensor_device_without_loop() -> None:
    codec, _ = make_codec()
    pieces = codec.pieces.to("cpu")
    ids, mask = assemble_prompt(pieces, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert ids.shape == (0, codec.prompt_width) and mask.shape == (0, codec.prompt_width)


def test_buffer_assembles_the_same_tokens_as_encode_prompts() -> None:
    """Acting (encode_prompts) and training (buffer.sample) must see identical prompt tokens."""
    from sacglam.replay.buffer import BufferConfig, ReplayBuffer
    from sacglam.replay.her import HERConfig
    from sacglam.types import TransitionBatch

    codec, _ = make_codec(bos_id=1)
    cfg = BufferConfig(capacity=8, device="cpu", max_obs_tokens=4, max_goal_tokens=3, max_cands=3, max_cand_tokens=2,
                       max_goals=4, max_achieved=1, her=HERConfig(ratio=0.0))
    buf = ReplayBuffer(cfg, 2, pad_id=0, prompt=codec)
    goals, obs, nxt = ["grasp red ball", "go"], ["you see a door", "dark"], ["a door opens", "light now"]
    gid = [buf.register_goal(codec.goal_tokens(g)) for g in goals]
    o, ol = codec.encode_observations(obs)
    no, nol = codec.encode_observations(nxt)
    c, cl = codec.encode_candidates([["go north", "take"], ["drop"]])
    buf.add(TransitionBatch(obs=o, obs_len=ol, next_obs=no, next_obs_len=nol, cands=c, cand_len=cl, next_cands=c,
                            next_cand_len=cl, goal=torch.tensor(gid), action=torch.tensor([1, 0]),
                            reward=torch.zeros(2), terminated=torch.tensor([True, True]),
                            truncated=torch.tensor([False, False]), achieved=torch.full((2, 1), -1),
                            logp=torch.zeros(2), policy_version=torch.zeros(2, dtype=torch.long)))
    b = buf.sample(16, torch.Generator().manual_seed(0))
    want_ids, want_mask = codec.encode_prompts(goals, obs)
    want_next, _ = codec.encode_prompts(goals, nxt)
    want_c, want_cm = codec.candidate_tensors([["go north", "take"], ["drop"]])
    for i in range(16):
        e = int(b.goal[i])  # goal id = env index here
        assert torch.equal(b.prompt_ids[i], want_ids[e]) and torch.equal(b.prompt_mask[i], want_mask[e])
        assert torch.equal(b.next_prompt_ids[i], want_next[e])
        assert torch.equal(b.cand_ids[i], want_c[e]) and torch.equal(b.cand_mask[i], want_cm[e])
    assert set(b.goal.tolist()) == {0, 1}


@pytest.mark.parametrize("joint", [True, False])
@settings(max_examples=40, deadline=None)
@given(
    pieces_len=st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 2)),
    widths=st.tuples(st.integers(0, 4), st.integers(0, 6)),
    rows=st.integers(1, 5),
    dtype=st.sampled_from([torch.int16, torch.int32, torch.int64]),
    seed=st.integers(0, 2**16),
)
def test_prompt_assembler_equals_assemble_prompt(joint: bool, pieces_len: tuple[int, int, int],
                                                 widths: tuple[int, int], rows: int, dtype: torch.dtype,
                                                 seed: int) -> None:
    """The buffer's table-driven assembler gives exactly ``assemble_prompt``'s ids and mask, for both table layouts
    (joint (gl, ol) table, or head/tail tables), empty pieces, zero lengths, and R = 2 prompts sharing their heads."""
    import sacglam.prompting as prompting
    from sacglam.prompting import PromptAssembler, PromptPieces

    g = torch.Generator().manual_seed(seed)
    P, M, Q = pieces_len
    Lg, Lo = widths
    pieces = PromptPieces(torch.randint(1, 99, (P,), generator=g), torch.randint(1, 99, (M,), generator=g),
                          torch.randint(1, 99, (Q,), generator=g), pad_id=int(torch.randint(0, 3, (1,), generator=g)))
    limit = prompting.JOINT_TABLE_MAX_ENTRIES
    prompting.JOINT_TABLE_MAX_ENTRIES = limit if joint else -1
    try:
        asm = PromptAssembler(pieces, Lg, Lo)
    finally:
        prompting.JOINT_TABLE_MAX_ENTRIES = limit
    assert (asm.joint_index is not None) == joint
    goal = torch.randint(0, 500, (rows, Lg), generator=g)  # ids past the length are garbage: they must not leak
    gl = torch.randint(0, Lg + 1, (rows,), generator=g)
    obs = torch.randint(0, 500, (2, rows, Lo), generator=g)
    ol = torch.randint(0, Lo + 1, (2, rows), generator=g)
    head = asm.heads(goal, gl).to(dtype)
    ids, mask = asm.assemble(head, gl.to(torch.int32), obs.to(dtype), ol.to(torch.int16))
    assert ids.shape == (2, rows, asm.prompt_width) and ids.dtype == torch.long and mask.dtype == torch.bool
    for r in range(2):
        want_ids, want_mask = assemble_prompt(pieces, goal, gl, obs[r], ol[r])
        assert torch.equal(ids[r], want_ids) and torch.equal(mask[r], want_mask)
