"""The report page's layout and figures, rendered from in-memory data: a grid of figures, plain tick
numbers on every axis, and no plot of a line that carries no information."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest

from ghsae.analysis import plots
from ghsae.analysis.page import evals_section
from ghsae.analysis.report import SAEKind

LAYERS = [0, 1, 2, 3]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions draw, kept open (plots closes each after saving it)."""
    figs: list = []
    close = plt.close
    monkeypatch.setattr(plots.plt, "close", figs.append)
    yield figs
    for fig in figs:
        close(fig)  # the real close: plt.close is still the patched append until monkeypatch undoes it


def offset_texts(fig) -> list[str]:
    return [t for ax in fig.axes for t in (ax.xaxis.get_offset_text().get_text(), ax.yaxis.get_offset_text().get_text()) if t]


def test_no_figure_moves_an_offset_or_power_of_ten_into_an_axis_corner(drawn):
    nearly_flat = [127.90, 127.91, 127.905, 127.92]  # matplotlib would label these "+1.279e2"
    plots.per_layer_metric(LAYERS, nearly_flat, [[0, 1], [2, 3]], "L0", [127.93, 127.9, 127.91, 127.9])
    plots.per_layer_metric(LAYERS, [1e-5, 2e-5, 3e-5, 4e-5], [[0, 3]], "MSE")
    tokens = np.linspace(1e9, 2e9, 50)
    plots.training_curves({"group_00": (tokens, np.linspace(0.5, 0.1, 50))})
    plots.distance_heatmap(np.full((4, 4), 0.3) + np.eye(4) * 1e-4, LAYERS, [[0, 1], [2, 3]], "raw")
    assert len(drawn) == 4
    for fig in drawn:
        assert offset_texts(fig) == []
    labels = [t.get_text() for t in drawn[0].axes[0].get_yticklabels()]
    assert any(label.startswith("127.9") for label in labels), labels


def test_a_line_is_flat_when_every_value_is_within_a_thousandth_of_the_largest():
    assert plots.is_flat([4.0, 4.0, float("nan"), 4.0])
    assert plots.is_flat([127.90, 127.92])
    assert not plots.is_flat([3.5, 4.0])
    assert not plots.is_flat([0.0, 1e-6])
    assert plots.is_flat([float("nan")])


def fake_report(architecture: str, l0: list[float], k: int = 4):
    rows = {
        layer: {"sae": f"group_0{layer // 2}", "l0": v, "fvu": 0.1 + 0.05 * layer, "mse": 0.01 * (layer + 1)}
        for layer, v in zip(LAYERS, l0)
    }
    target = SimpleNamespace(name="group_00", sae=SimpleNamespace(cfg=SimpleNamespace(architecture=architecture, k=k)))
    return SimpleNamespace(
        plan=SimpleNamespace(layers=LAYERS, groups=[[0, 1], [2, 3]]),
        rows=lambda kind: rows if kind is SAEKind.GROUP else {},
        sides=[SimpleNamespace(targets=[target])],
    )


def test_a_topk_runs_evals_hold_its_figures_in_a_grid_and_say_l0_equals_k_instead_of_plotting_it():
    page = evals_section(fake_report("topk", [3.98, 3.99, 4.0, 3.97]))
    assert '<div class="figures">' in page
    assert 'alt="FVU per layer"' in page and 'alt="L0 per layer"' not in page
    assert "L0 = k = 4 for every token" in page


def test_a_relu_runs_varying_l0_is_plotted_and_a_flat_metric_is_stated_instead():
    page = evals_section(fake_report("relu", [12.0, 30.0, 18.0, 25.0]))
    assert 'alt="L0 per layer"' in page
    flat = fake_report("relu", [7.0] * 4)
    page = evals_section(flat)
    assert 'alt="L0 per layer"' not in page and "L0 is 7.0 at every layer" in page
