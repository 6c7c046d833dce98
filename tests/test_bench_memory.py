"""Smoke test of scripts/bench_memory.py: tiny shapes, old and new scorer paths, each in its own process."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.mark.integration
def test_bench_memory_quick_run(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    results = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    assert set(results) == {(m, p) for m in ("tiny-t5", "tiny-llama") for p in ("old", "new")}
    for (model, _), r in results.items():
        assert r["peak total"] > r["rss before"] > 0 and r["seconds"] > 0 and math.isfinite(r["loss"])
        assert r["real cand tokens"] == results[(model, "new")]["real cand tokens"] > 0
    # The same update was measured on both paths: the same loss where no dropout runs (the models train in train
    # mode as in training; T5's dropout draws different masks on the packed and the repeated layouts).
    old, new = results[("tiny-llama", "old")], results[("tiny-llama", "new")]
    assert abs(old["loss"] - new["loss"]) < 1e-4 * max(1.0, abs(new["loss"]))
    table = out.read_text()
    assert "| tiny-t5 |" in table and "| tiny-llama |" in table and "ratio = old / new" in table
