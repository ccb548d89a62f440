"""The report's figures, each returned as PNG bytes so the HTML page can embed them."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, ScalarFormatter  # noqa: E402

GROUP_COLOUR, BASE_COLOUR = "#1f77b4", "#d62728"


def _png(fig) -> bytes:
    _plain_numbers(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _tick(value: float, _pos=None) -> str:
    return f"{value:.6g}"


def _plain_numbers(fig) -> None:
    """Every linear axis labels its ticks with the numbers themselves: matplotlib's default moves a
    shared offset or power of ten into a corner (`+1.279e2`), which a reader misses or misreads."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if isinstance(axis.get_major_formatter(), ScalarFormatter):
                axis.set_major_formatter(FuncFormatter(_tick))


def is_flat(values: list[float], rel: float = 1e-3) -> bool:
    """Whether a line of these values (nan: missing) would be flat: every finite value within `rel`
    of the largest magnitude, so a plot would show only noise (or nothing)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return True
    return bool(np.ptp(finite) <= rel * max(float(np.abs(finite).max()), 1e-30))


def _shade_groups(ax, groups: list[list[int]]) -> None:
    for i, g in enumerate(groups):
        if i % 2:
            ax.axvspan(g[0] - 0.5, g[-1] + 0.5, color="0.93", zorder=0)


def per_layer_metric(
    layers: list[int],
    ours: list[float],
    groups: list[list[int]],
    title: str,
    baseline: list[float] | None = None,
    log: bool = False,
) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    _shade_groups(ax, groups)
    ax.plot(layers, ours, "o-", color=GROUP_COLOUR, ms=3, label="group SAEs")
    if baseline is not None:
        ax.plot(layers, baseline, "s--", color=BASE_COLOUR, ms=3, label="per-layer SAEs")
        ax.legend(fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer (shaded bands: groups)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def density_histogram(densities: dict[str, np.ndarray], title: str) -> bytes:
    """log10 firing rate per latent; latents that never fired are counted at the left edge."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    floor = -7.0
    bins = np.linspace(floor, 0, 57).tolist()
    for name, d in densities.items():
        logd = np.where(d > 0, np.log10(np.maximum(d, 1e-30)), floor)
        ax.hist(np.clip(logd, floor, 0), bins=bins, histtype="step", label=f"{name} ({int((d == 0).sum())} dead)")
    ax.set_xlabel(f"log10 firing rate on the eval tokens (dead latents at {floor:g})")
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def distance_heatmap(dist: np.ndarray, layers: list[int], groups: list[list[int]], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    im = ax.imshow(dist, cmap="viridis", origin="upper", extent=(-0.5, len(layers) - 0.5, len(layers) - 0.5, -0.5))
    pos = {layer: i for i, layer in enumerate(layers)}
    for g in groups:
        a, b = pos[g[0]] - 0.5, pos[g[-1]] + 0.5
        ax.plot([a, b, b, a, a], [a, a, b, b, a], color="white", lw=1.2)
    ticks = list(range(0, len(layers), max(1, len(layers) // 10)))
    ax.set_xticks(ticks, [str(layers[i]) for i in ticks])
    ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="angular distance")
    return _png(fig)


def amad_curve(curves: dict[str, np.ndarray], threshold: float, chosen: int) -> bytes:
    """AMAD of each grouping method's partition against G."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for (label, values), style in zip(curves.items(), ("o-", "x--", "s:")):
        ax.plot(np.arange(1, len(values) + 1), values, style, ms=3, label=label)
    ax.axhline(threshold, color="0.4", ls=":", label=f"threshold {threshold:g}")
    ax.axvline(chosen, color=GROUP_COLOUR, lw=1, label=f"this run's G = {chosen}")
    ax.set_xlabel("number of groups G")
    ax.set_ylabel("AMAD")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def training_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """FVU of each SAE's training batches against training tokens."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for name, (tokens, fvu) in curves.items():
        ax.plot(tokens, fvu, label=name, lw=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("batch FVU")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


SWEEP_COLOUR, AUTO_COLOUR = "#1f77b4", "#ff7f0e"


def sweep_metric(
    label: str,
    n_groups: list[int],
    seconds: list[float],
    values: list[float],
    errors: list[float],
    auto: list[bool],
    reference: tuple[float, float, float, int] | None,
) -> bytes:
    """A metric against G (left) and against compute A + G·T (right), ± one standard error; the
    per-layer SAEs (value, error, seconds, L) as the reference; the AMAD-chosen G marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.2), sharey=True)
    err = np.nan_to_num(np.asarray(errors, dtype=float))
    for ax, x in ((left, n_groups), (right, seconds)):
        ax.errorbar(x, values, yerr=err, fmt="o-", color=SWEEP_COLOUR, ms=4, capsize=3, label="group SAEs")
        for xi, yi, is_auto in zip(x, values, auto):
            if is_auto:
                ax.plot([xi], [yi], marker="*", ms=14, color=AUTO_COLOUR, ls="none", label="G the AMAD rule picks")
        ax.grid(alpha=0.3)
    if reference is not None:
        value, error, total, n_layers = reference
        for ax in (left, right):
            ax.axhline(value, color=BASE_COLOUR, ls="--", lw=1, label="per-layer SAEs")
            if np.isfinite(error):
                ax.axhspan(value - error, value + error, color=BASE_COLOUR, alpha=0.1)
        left.plot([n_layers], [value], "s", color=BASE_COLOUR, ms=5)
        right.plot([total], [value], "s", color=BASE_COLOUR, ms=5)
    left.set_xlabel("G (number of groups; L = per-layer)")
    right.set_xlabel("compute A + G·T (s, measured)")
    left.set_ylabel(label)
    left.legend(fontsize=7)
    fig.suptitle(f"{label} against G and against compute", fontsize=10)
    return _png(fig)


def sweep_per_layer(label: str, layers: list[int], lines: dict[str, list[float]]) -> bytes:
    """A metric at each layer, one line per grouping (per-layer dashed)."""
    fig, ax = plt.subplots(figsize=(9.6, 3.2))
    for name, values in lines.items():
        style = dict(color=BASE_COLOUR, ls="--", lw=1.5) if name == "per-layer" else dict(lw=1)
        ax.plot(layers, values, marker=".", ms=3, label=name, **style)
    ax.set_xlabel("layer")
    ax.set_ylabel(label)
    ax.set_title(f"{label} per layer, each grouping", fontsize=10)
    ax.legend(fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    return _png(fig)


def transfer_curves(scratch: dict[str, tuple], transfer: dict[str, tuple]) -> bytes:
    """Training-batch FVU against tokens, from scratch and with transfer: thin per group (after the
    first, which has nothing to transfer from), bold the mean."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for curves, colour, label in ((scratch, BASE_COLOUR, "from scratch"), (transfer, SWEEP_COLOUR, "transfer")):
        series = list(curves.values())[1:]
        for tokens, fvu in series:
            ax.plot(tokens, fvu, color=colour, alpha=0.25, lw=0.8)
        if series:
            n = min(len(f) for _, f in series)
            ax.plot(series[0][0][:n], np.mean([f[:n] for _, f in series], axis=0), color=colour, lw=2, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("batch FVU")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def budget_gap(panels: list[tuple[str, dict[str, tuple[list, list, list, list]]]]) -> bytes:
    """Per metric, the relative gap against tokens per SAE (left) and per layer (right), log x, one line
    per grouping: name -> (tokens per SAE, tokens per layer, gap %, error %)."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(9.6, 3.2 * len(panels)), squeeze=False)
    for (label, lines), (left, right) in zip(panels, axes):
        for name, (x, xl, y, err) in lines.items():
            for ax, xs in ((left, x), (right, xl)):
                ax.errorbar(xs, y, yerr=err, fmt="o-", ms=4, capsize=3, label=name)
        for ax, xlabel in ((left, "tokens per SAE"), (right, "tokens per layer")):
            ax.set_xscale("log")
            ax.axhline(0, color=BASE_COLOUR, ls="--", lw=1)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        left.set_ylabel(label, fontsize=8)
        left.legend(fontsize=7)
    fig.suptitle("relative gap to per-layer SAEs against training budget", fontsize=10)
    return _png(fig)
