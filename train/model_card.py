"""The README.md model card of an exported folder: what the SAEs are, how they were trained, how they
did in the run's report, with Hub-style YAML front matter so the folder can be uploaded as it is."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ghsae.errors import DamagedFileError
from ghsae.layers import span
from ghsae.layout import REPORT_METRICS
from ghsae.run import Run
from ghsae.sae import REGISTRY

# (metrics.parquet column, heading, format): the report's figures a card shows, where present
CARD_METRICS = (
    ("fvu", "FVU", "{:.3f}"),
    ("explained_variance", "explained variance", "{:.3f}"),
    ("l0", "L0", "{:.1f}"),
    ("delta_ce_pct", "ΔCE %", "{:.2f}"),
    ("kl", "KL (nats)", "{:.4f}"),
    ("ce_score", "CE score", "{:.3f}"),
    ("dead_pct", "dead %", "{:.1f}"),
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LOADING = {
    "saelens": 'from sae_lens import SAE\n\nsae = SAE.load_from_disk("{folder}")',
    "sparsify": 'from sparsify import SparseCoder\n\nsae = SparseCoder.load_from_disk("{folder}")',
}


@dataclass(frozen=True)
class ExportFacts:
    """What every folder of one export shares."""

    fmt: str  # saelens | sparsify
    model: str  # the model as the run names it (a folder, a .gguf file, a hub id, builtin:...)
    model_class: str  # the transformers class ghsae loaded
    hookpoint: str
    dataset: str
    context_size: int
    config_hash: str
    run: str
    unit_decoder: bool


@dataclass(frozen=True)
class ExportedLayer:
    """One exported folder: one layer of a group SAE."""

    layer: int
    folder: str  # the folder's name: the target library's name of the hookpoint
    group: str
    group_layers: list[int]
    architecture: str
    k: int
    d_in: int
    d_sae: int
    tokens: int  # tokens the group SAE trained on, all its layers together


def eval_figures(run: Run) -> dict[int, dict[str, float]] | None:
    """The report's figures of the run's own SAEs (seed 0) by layer; None when the run has no report."""
    path = run.layout.report_file(REPORT_METRICS)
    if not path.is_file():
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DamagedFileError(
            f"{path} is damaged ({type(e).__name__}); re-run `ghsae report {run.root}`, "
            "or move it away to export without evaluation figures"
        ) from None
    own = [r for r in rows if r.get("kind") == "group" and not r.get("seed")]
    return {int(r["layer"]): {k: float(r[k]) for k, _, _ in CARD_METRICS if _finite(r.get(k))} for r in own}


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def front_matter(facts: ExportFacts) -> str:
    """Hub metadata; base_model only when the model is named by a Hub id (the Hub checks it)."""
    lines = ["---"]
    if facts.fmt == "saelens":
        lines.append("library_name: saelens")
    lines += ["tags:", "- sparse-autoencoder", "- group-sae", "- ghsae", f"- {facts.fmt}"]
    if _HUB_ID.match(facts.model) and not Path(facts.model).expanduser().exists():
        lines.append(f"base_model: {json.dumps(facts.model)}")
    return "\n".join([*lines, "---", ""])


def model_card(facts: ExportFacts, layers: list[ExportedLayer], evals: dict[int, dict[str, float]] | None) -> str:
    """The card of a folder holding `layers` (one for a layer's folder, all of them for OUT)."""
    first = layers[0]
    ids = [e.layer for e in layers]
    where = f"layer {ids[0]}" if len(ids) == 1 else f"layers {span(ids)}"
    parts = [
        front_matter(facts),
        f"# Group-SAE{'s' if len(layers) > 1 else ''} of {facts.model}, {facts.hookpoint}, {where}",
        "",
        "Sparse autoencoders trained with ghsae: one SAE per group of contiguous, similar layers "
        "(Ghilardi et al., EMNLP 2025), exported one folder per layer with that layer's normalisation "
        "folded into the weights, so each takes the model's raw activations.",
        "",
        _table(
            ["", ""],
            [
                ["model", f"`{facts.model}` ({facts.model_class})"],
                ["hookpoint", f"{facts.hookpoint}; folder{'s' if len(layers) > 1 else ''} {_folders(layers)}"],
                ["architecture", _architecture(first)],
                ["decoder rows", _decoder(facts)],
                ["dataset", f"`{facts.dataset}`, contexts of {facts.context_size} tokens"],
                ["format", f"{facts.fmt} (ghsae run `{facts.run}`, config {facts.config_hash[:12]})"],
            ],
        ),
        "",
        "## Groups and training tokens",
        "",
        _table(["folder", "layer", "group", "group's layers", "tokens trained (group SAE)"], _group_rows(layers)),
        "",
        "## Evaluation",
        "",
        _evaluation(layers, evals),
        "",
        "## Loading",
        "",
        "```python",
        _LOADING[facts.fmt].format(folder=first.folder),
        "```",
        "",
    ]
    return "\n".join(parts)


def _folders(layers: list[ExportedLayer]) -> str:
    names = [f"`{e.folder}`" for e in layers]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def _architecture(e: ExportedLayer) -> str:
    keeps_k = e.architecture in REGISTRY and REGISTRY[e.architecture].keeps_k
    k = f", k = {e.k}" if keeps_k else ""
    return f"{e.architecture}{k}, d_in = {e.d_in}, d_sae = {e.d_sae}"


def _decoder(facts: ExportFacts) -> str:
    if facts.unit_decoder:
        return "unit norm (the layer's scale s moved into the latents: they are ghsae's latents / s)"
    return "norm 1/s (s the layer's normalisation scale), latents equal to ghsae's"


def _group_rows(layers: list[ExportedLayer]) -> list[list[str]]:
    return [[f"`{e.folder}`", str(e.layer), e.group, span(e.group_layers), f"{e.tokens:,}"] for e in layers]


def _evaluation(layers: list[ExportedLayer], evals: dict[int, dict[str, float]] | None) -> str:
    if evals is None:
        return "None: the run had no report when it was exported (`ghsae report RUN` makes one)."
    shown = [m for m in CARD_METRICS if any(m[0] in evals.get(e.layer, {}) for e in layers)]
    if not shown:
        return "None: the run's report holds no figures for these layers."
    rows = []
    for e in layers:
        figures = evals.get(e.layer, {})
        rows.append([str(e.layer), *(fmt.format(figures[k]) if k in figures else "-" for k, _, fmt in shown)])
    note = "On the report's held-out tokens (report/metrics.parquet of the run)."
    return note + "\n\n" + _table(["layer", *(h for _, h, _ in shown)], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
