"""``scripts/bench_data_parallel.py``: its table and ratio by hand, its argument checks, and one quick real run of
1 and 2 processes (rates positive, and the updates per env step the same for both: the replay ratio is kept)."""

from __future__ import annotations

import re

import pytest

from tests.scripts_util import load_script


def test_table_ratio_by_hand() -> None:
    bench = load_script("bench_data_parallel")
    rates = [bench.Rate(1, 2, 100.0, 25.0, (5.0, 9.0)), bench.Rate(2, 1, 150.0, 37.5, (6.0, 8.5))]
    out = bench.table(rates, 64, 192)
    assert "| 1 | 2 | 5.0 / 9.0 | 100.0 | 25.00 | 1.00x |" in out
    assert "| 2 | 1 | 6.0 / 8.5 | 150.0 | 37.50 | 1.50x |" in out
    assert bench.FINAL.search("final greedy success 0.250 after 320 env steps and 140 updates; run folder x").groups(
    ) == ("320", "140")


@pytest.mark.parametrize("argv, message", [(["--short", "100", "--long", "50"], "must exceed"),
                                           (["--procs", "1"], "give 2 or more")])
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench_data_parallel")
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_quick_run_measures_both() -> None:
    bench = load_script("bench_data_parallel")
    out = bench.main(["--quick", "--cores", "2", "--", "batch_size=8", "learning_starts=16",
                      "env.kwargs.goal_categories=[grasp,grow_plant]"])  # short episodes: updates within --short
    rows = [line for line in out.splitlines() if re.match(r"\| [12] \|", line)]
    assert len(rows) == 2
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["1", "2"] and [c[1] for c in cells] == ["2", "1"]
    env_rates, update_rates = [float(c[3]) for c in cells], [float(c[4]) for c in cells]
    assert all(r > 0 for r in env_rates) and all(r > 0 for r in update_rates)
    # replay ratio 4 over batch 8: one update every two env steps for 1 process and for 2
    for env_rate, update_rate in zip(env_rates, update_rates, strict=True):
        assert update_rate / env_rate == pytest.approx(0.5, rel=0.1)
