"""Print the sizing table of docs/scale.md: disk, LM forward FLOPs (A) and SAE training FLOPs (T)
at a token budget, per-layer against grouped, from the storage contract and per-token costs.

    python scripts/sizing.py [--tokens 1e9] [--expansion 16] [--measured-run runs/default]

Costs per token (stated so they can be checked):
- storage: one row per stored layer = d values * 2 bytes + the row metadata of the contract
  (cache/store.py ROW_FIELDS); grouped stores one row per group, per-layer one per layer.
- A: a forward pass stopped after the last block: 2 FLOPs per non-embedding parameter (the
  unembedding is never run). The same for grouped and per-layer: both need every layer's output.
- T: one SAE training step per token: encoder and decoder forward (2*d*m each) and backward
  (twice the forward): 12*d*m, m = expansion * d, and one SAE per group or per layer.
G for the models the paper did not measure is an assumption: the mean G/L of the paper's three
Pythia results (6/12, 9/24, 6/16), rounded. --measured-run adds the bytes/token a real store took.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass
class Model:
    name: str
    layers: int
    d_model: int
    non_embedding_params: float
    groups: int
    groups_source: str


PAPER_G_OVER_L = (6 / 12 + 9 / 24 + 6 / 16) / 3


def assumed_groups(layers: int) -> int:
    return max(1, round(layers * PAPER_G_OVER_L))


MODELS = [
    Model("SmolLM2-135M (embedded default)", 30, 576, 106.2e6, 5, "measured here, AMAD 0.199"),
    Model("Pythia-160M", 12, 768, 85.1e6, 6, "the paper's G^"),
    Model("Gemma-2-2B", 26, 2304, 2.02e9, assumed_groups(26), "assumed: the paper's mean G/L"),
    Model("Llama-3-8B", 32, 4096, 6.98e9, assumed_groups(32), "assumed: the paper's mean G/L"),
]


def row_bytes(d_model: int) -> int:
    from ghsae.cache.store import ROW_METADATA_BYTES

    return 2 * d_model + ROW_METADATA_BYTES


def human(n: float, unit: str) -> str:
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


def table(tokens: float, expansion: int) -> list[str]:
    lines = [
        f"Budget: {tokens:,.0f} tokens through the LM; each SAE trained on {tokens:,.0f} tokens; expansion {expansion}.",
        "",
        "| model | L | d | G (source) | disk per-layer | disk grouped | A (LM FLOPs) | L·T | G·T | "
        "A+L·T | A+G·T | saving |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        rb = row_bytes(m.d_model)
        disk_l, disk_g = tokens * m.layers * rb, tokens * m.groups * rb
        A = 2 * m.non_embedding_params * tokens
        T = 12 * m.d_model * (expansion * m.d_model) * tokens
        total_l, total_g = A + m.layers * T, A + m.groups * T
        lines.append(
            f"| {m.name} | {m.layers} | {m.d_model} | {m.groups} ({m.groups_source}) | {human(disk_l, 'B')} | "
            f"{human(disk_g, 'B')} | {human(A, 'FLOP')} | {human(m.layers * T, 'FLOP')} | {human(m.groups * T, 'FLOP')} | "
            f"{human(total_l, 'FLOP')} | {human(total_g, 'FLOP')} | {total_l / total_g:.2f}x |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--measured-run", help="a harvested run whose bytes/token to print beside the contract's")
    args = ap.parse_args()
    print("\n".join(table(args.tokens, args.expansion)))
    if args.measured_run:
        from pathlib import Path

        from ghsae.run import Run

        run = Run.open(Path(args.measured_run))
        info = run.info()
        d, groups = len(info.layers), len(info.groups)
        contract = groups * row_bytes(run.plan.d_model)
        print(
            f"\nMeasured on {args.measured_run}: {info.bytes_per_token or 0:,.0f} B/token on disk for {groups} groups over "
            f"{d} layers; the contract gives {contract:,} B/token (difference: Zarr metadata and the last, "
            f"partly filled chunk); {math.ceil(info.per_layer_bytes_per_token):,} B/token for every layer."
        )


if __name__ == "__main__":
    main()
