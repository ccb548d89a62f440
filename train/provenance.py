"""What an SAE was trained with: the fit settings and the store state, recorded so a resume is honest.

A checkpoint (and the finished SAE's cfg.json) records both. A re-fit compares them with the
current command's and refuses to continue on any difference, listing the differing keys, unless
asked to start over (`ghsae fit --overwrite`). Before this record existed a re-run with another
lr kept the old weights and wrote the new lr into cfg.json, and a fit begun with --allow-partial
was continued on the completed store with the partial store's normalisation (issue 9).
"""

from __future__ import annotations

import hashlib
from typing import Any

from ghsae.cache.manifest import Plan, load_shard_record
from ghsae.config import PipelineConfig
from ghsae.layout import RunLayout

# Fit fields that change how training runs but not its result (runtime() fields are already out).
_NOT_RESULT = ("checkpoint_tokens",)


def fit_settings(cfg: PipelineConfig) -> dict[str, Any]:
    settings = cfg.identity(("fit",))["fit"]
    return {k: v for k, v in settings.items() if k not in _NOT_RESULT}


def store_state(layout: RunLayout, plan: Plan, group: str, shards: list[int]) -> dict[str, Any]:
    """The harvest config, the shards trained on, and a digest of their records' checksums for this group."""
    h = hashlib.sha256()
    for s in shards:
        record = load_shard_record(layout, s, plan.data["config_hash"])
        h.update(f"{s}:{sorted(record['groups'][group]['checksums'].items())}".encode())
    return {
        "config_hash": plan.data["config_hash"],
        "shards": list(shards),
        "n_shards": plan.n_shards,
        "rows_digest": h.hexdigest()[:16],
    }


def provenance(cfg: PipelineConfig, layout: RunLayout, plan: Plan, group: str, shards: list[int]) -> dict[str, Any]:
    return {"fit": fit_settings(cfg), "store": store_state(layout, plan, group, shards)}


def provenance_diffs(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> list[str]:
    """Differing keys as 'fit.lr: 0.003 in the checkpoint, 0.01 now'; a record without provenance differs."""
    if saved is None:
        return [f"the {where} records no fit settings or store state (made by an older ghsae)"]
    diffs = []
    for section in ("fit", "store"):
        a, b = saved.get(section) or {}, now.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                note = ""
                if section == "store" and key == "shards" and len(a.get(key, [])) < a.get("n_shards", 0):
                    note = " (begun with --allow-partial on an incomplete store)"
                diffs.append(f"{section}.{key}: {_short(a.get(key))} in the {where}, {_short(b.get(key))} now{note}")
    return diffs


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
