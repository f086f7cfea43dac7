"""report.py's "% embag": the paired figure (conftest.py paired_with_limit: the provider's calls
interleaved with embedding_bag's) wins over the ratio of two separately timed rows."""
from report import _ratios


def _row(provider, t, **extra):
    return dict(op="nce", case="c", provider=provider, time_median_s=t, peak_extra_bytes=None, **extra)


def test_pct_of_embag_from_the_separate_rows():
    rows = [_row("eager", 1.0), _row("fused-cpu", 0.04), _row("embedding_bag", 0.01)]
    _ratios(rows)
    assert rows[1]["pct_of_embag"] == 25.0
    assert rows[2]["pct_of_embag"] is None          # the limit row is not held against itself


def test_pct_of_embag_prefers_the_paired_figure():
    rows = [_row("eager", 1.0), _row("fused-cpu", 0.04, paired_pct_of_embag=55.0),
            _row("fused-cpu+4k", 0.05), _row("embedding_bag", 0.01)]
    _ratios(rows)
    assert rows[1]["pct_of_embag"] == 55.0
    assert rows[2]["pct_of_embag"] == 20.0          # no paired figure: the separate rows
