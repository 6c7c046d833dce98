"""scripts/bench_ab.py: the A/B table of bench.py runs of two trees (parsing, medians, ratios)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts_util import load_script

bench_ab = load_script("bench_ab")

RUN = """[bench] tiny: 86,400 params
SAC training throughput on CPU (1 threads), ...

| model | grad accum | env steps/s | updates/s | update % | MFU % |
|---|---|---|---|---|---|
| tiny | 1 | {steps} | 0.5 | 90.1 | 30 |
| other | 2 | 1,000.5 | n/a | 50 | 10 |
"""


def test_parse_table_reads_the_last_table_by_header() -> None:
    rows = bench_ab.parse_table("| a | b |\n|---|---|\n| 1 | 2 |\n\n" + RUN.format(steps="12.5"))
    assert [r["model"] for r in rows] == ["tiny", "other"]
    assert rows[0]["env steps/s"] == "12.5" and rows[1]["grad accum"] == "2"
    assert bench_ab.number("1,000.5") == 1000.5 and bench_ab.number("n/a") is None
    with pytest.raises(ValueError, match="no markdown table"):
        bench_ab.parse_table("no table here")


def test_medians_and_ratios() -> None:
    ref = bench_ab.median_rows([bench_ab.parse_table(RUN.format(steps=s)) for s in ("10", "30", "20")])
    new = bench_ab.median_rows([bench_ab.parse_table(RUN.format(steps=s)) for s in ("41", "39")])
    assert ref["tiny"]["env steps/s"] == 20 and new["tiny"]["env steps/s"] == 40
    assert "updates/s" not in ref["other"]  # a cell that is not a number is left out
    table = bench_ab.format_ab(ref, new, ("env steps/s", "MFU %"))
    assert "| tiny | env steps/s | 20 | 40 | 2.00x |" in table
    assert "| tiny | MFU % | 30 | 30 | 1.00x |" in table


def test_a_reference_that_is_not_a_tree_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a sacglam tree"):
        bench_ab.main(["--ref", str(tmp_path), "--rounds", "1"])
