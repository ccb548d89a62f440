"""The metric table's own rules: a mistake in it would show only as a wrong page, late."""

from ghsae.analysis import metric_table as mt


def test_every_key_is_declared_once():
    assert len(mt.BY_KEY) == len(mt.METRICS)


def test_the_sweep_page_shows_only_metrics_with_a_standard_error():
    # its gaps are paired by context: a metric without per-context influences has none to pair
    assert all(m.se for m in mt.SWEEP)


def test_every_gap_metric_has_its_typical_twin():
    for m in mt.GAP:
        assert m.key + mt.TYPICAL in mt.BY_KEY, m.key


def test_every_format_formats_a_number():
    for m in mt.METRICS:
        assert m.fmt.format(0.5) and m.diff_spec.format(-0.25)
