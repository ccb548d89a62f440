"""What an SAE was trained with: the fit settings and the store state, recorded so a resume is honest.

A checkpoint (and the finished SAE's cfg.json) records both. A re-fit compares them with the
current command's and refuses to continue on any difference, listing the differing keys, unless
asked to start over (`ghsae fit --overwrite`). Before this record existed a re-run with another
lr kept the old weights and wrote the new lr into cfg.json, and a fit begun with --allow-partial
was continued on the completed store with the partial store's normalisation.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ghsae.config import PipelineConfig
from ghsae.records import Provenance, StoreState
from ghsae.run import Run

# Fit fields that change how training runs but not its result (runtime() fields are already out).
_NOT_RESULT = ("checkpoint_tokens",)


def fit_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The [fit] fields that decide an SAE's weights."""
    settings = cfg.identity(("fit",))["fit"]
    if settings.get("outliers", "keep") == "keep":
        settings.pop("outlier_factor", None)  # where nothing is done to outliers, their threshold decides nothing
    return {k: v for k, v in settings.items() if k not in _NOT_RESULT}


# Fit fields that may differ between the SAEs of one run: a transfer run starts each SAE from another
# (Ghilardi et al., BlackboxNLP 2024). Each SAE's provenance still records them.
PER_SAE = ("init_from",)


def run_fit_settings(fit: dict[str, Any]) -> dict[str, Any]:
    """Of an SAE's or a run's fit settings, those every SAE of the run must share."""
    return {k: v for k, v in fit.items() if k not in PER_SAE}


def store_state(run: Run, group: str, shards: list[int]) -> StoreState:
    """The harvest config, the shards trained on, and a digest of their records' checksums for this group."""
    h = hashlib.sha256()
    for s in shards:
        checksums = run.shard_record(s).groups[group].checksums
        h.update(f"{s}:{sorted(checksums.items())}".encode())
    return StoreState(run.plan.config_hash, tuple(shards), run.plan.n_shards, h.hexdigest()[:16])


def provenance(cfg: PipelineConfig, run: Run, group: str, shards: list[int]) -> Provenance:
    return Provenance(fit_settings(cfg), store_state(run, group, shards))


def settings_diffs(saved: dict[str, Any], now: dict[str, Any], where: str) -> list[str]:
    """'fit.lr: 0.003 in the WHERE, 0.01 now' for each fit setting that differs."""
    return [
        f"fit.{key}: {_short(saved.get(key))} in the {where}, {_short(now.get(key))} now"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def provenance_diffs(saved: Provenance | None, now: Provenance, where: str) -> list[str]:
    """Differing keys as 'fit.lr: 0.003 in the checkpoint, 0.01 now'; a record without provenance differs."""
    if saved is None:
        return [f"the {where} records no fit settings or store state (made by an older ghsae)"]
    diffs = settings_diffs(dict(saved.fit), dict(now.fit), where)
    a, b = saved.store.to_json(), now.store.to_json()
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            note = ""
            if key == "shards" and len(a.get(key, [])) < a.get("n_shards", 0):
                note = " (begun with --allow-partial on an incomplete store)"
            diffs.append(f"store.{key}: {_short(a.get(key))} in the {where}, {_short(b.get(key))} now{note}")
    return diffs


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recorded_run_fit(run: Run) -> tuple[dict[str, Any], str] | None:
    """The result-deciding fit settings the run's SAEs share, and where they were read: saes/fit.json,
    or, for a run fitted before that file existed, the first trained SAE's provenance. None when the
    run has neither (nothing is trained yet)."""
    from ghsae.config import config_from_dict

    saved = run.fit_settings()
    if saved is not None:
        cfg = config_from_dict({"fit": dict(saved.fit)}, source=str(run.layout.fit_settings))
        return run_fit_settings(fit_settings(cfg)), "run"
    for group in run.trained_groups():
        record = run.sae_record(group)
        if record.provenance is not None:
            return run_fit_settings(dict(record.provenance.fit)), f"trained SAE {group}"
    return None


def settings_mismatch(run: Run, group: str) -> list[str]:
    """How the trained SAE of `group` differs from the fit settings the run records (saes/fit.json),
    apart from the per-SAE ones; empty when they agree or when either side records none."""
    record = run.sae_record(group)
    if not run.layout.fit_settings.is_file() or record.provenance is None:
        return []
    recorded = recorded_run_fit(run)
    assert recorded is not None  # saes/fit.json exists
    return settings_diffs(run_fit_settings(dict(record.provenance.fit)), recorded[0], "SAE")
