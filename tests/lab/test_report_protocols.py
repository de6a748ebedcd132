"""A report over runs of several protocols never averages them together."""

from __future__ import annotations

from normlab.lab.analysis.report import key_comparisons, render_markdown, summarize, summary_dicts
from normlab.lab.run.train import EpochStats, RunConfig, RunRecord


def _rec(seed: int, epochs: int, error: float, norm: str = "bn") -> RunRecord:
    cfg = RunConfig(norm=norm, batch_size=8, seed=seed, epochs=epochs)
    return RunRecord(cfg, [EpochStats(1, 1.0, 50.0, error, 0.01)], error, 1.0, False, 10, 5, 1)


def test_protocols_get_rows_of_their_own():
    records = [
        *(_rec(s, 3, 10.0 + s) for s in range(3)),
        _rec(0, 1, 60.0),  # seed 0 again, but trained for 1 epoch
        *(_rec(s, 3, 20.0 + s, norm="gn") for s in range(3)),
    ]
    cells = summarize(records)
    rows = {(c.norm, c.protocol): c for c in cells}
    assert rows[("bn", "epochs=3")].errors == (10.0, 11.0, 12.0)
    assert rows[("bn", "epochs=1")].errors == (60.0,)
    assert rows[("bn", "epochs=3")].row == "BN (epochs=3)"
    assert sum(c.n for c in cells if c.norm == "bn") == 4  # no seed counted twice
    md = render_markdown(records, plot_name=None)
    assert "| BN (epochs=3) | 11.0 ± 1.0 |" in md and "| BN (epochs=1) | 60.0 ± – |" in md
    assert "### Protocol epochs=1" in md and "### Protocol epochs=3" in md
    assert "1 epochs at every batch size" in md and "3 epochs at every batch size" in md
    assert {d["protocol"] for d in summary_dicts(cells)} == {"epochs=1", "epochs=3"}
    # Compared only within a protocol: GN vs BN under epochs=3.
    assert [(k.a.row, k.b.row) for k in key_comparisons(cells)] == [
        ("GN (epochs=3)", "BN (epochs=3)")
    ]


def test_one_protocol_reads_as_before():
    records = [_rec(s, 3, 10.0 + s) for s in range(2)]
    (cell,) = summarize(records)
    assert cell.protocol == "" and cell.row == "BN"
    assert "protocol" not in summary_dicts([cell])[0]
    assert "### Protocol" not in render_markdown(records, plot_name=None)
