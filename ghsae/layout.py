"""Every path inside a run folder, built in one place.

RUN/ghsae-run.json            marker: this folder is a ghsae run (format version); written first
RUN/derived.json              a run derived from an all-layers run: the source (harvest/derive.py)
RUN/per-layer/                the all-layers run of a comparison (a run folder of its own)
RUN/seed<s>/                  seed s >= 1 of a comparison (compare.seeds): a run folder like RUN, its
                              store derived from RUN/per-layer with the seed's layer draw, its per-layer/
                              hard links to RUN/per-layer's store with the seed's spot-check SAEs
RUN/.locks/                   advisory lock files (run, plan, shard-N, sae-<group>)
RUN/config.json               resolved config (written once the plan exists)
RUN/plan/plan.json            groups, shard geometry, model/tokenizer/dataset fingerprints
RUN/plan/tokens.npy           packed contexts [n_contexts, context_length] int32
RUN/plan/similarity.npz       angular distances (raw, centred), AMAD curve, probe statistics
RUN/acts.zarr/<group>/...     activations and row metadata, one array set per group
RUN/manifest/shard-00012.json completion record of shard 12 (temp file, then rename)
RUN/manifest/shard-00012.npz  per-layer activation sums of shard 12 (written before the record)
RUN/manifest/stats.json       per-layer normalisation statistics over all shards (once complete)
RUN/manifest/stats.npz        per-layer mean vectors and scales over all shards (once complete)
RUN/saes/fit.json             the fit settings this run's SAEs are trained with (written by `ghsae fit`)
RUN/saes/<group>/             cfg.json + sae.safetensors, checkpoint.pt, metrics.parquet
RUN/tensorboard/<group>/      TensorBoard event files of each SAE's training (fit.log = ["tensorboard"])
RUN/wandb/                    W&B's offline runs, one per SAE (fit.log = ["wandb"]; written by wandb itself)
RUN/report/                   report.html, metrics.parquet, summary.md, settings.json, circuits.parquet,
                              rating.html, rating-key-<kit>.json (one per rating page), ratings.json
                              (runs made before per-page keys hold one rating-key.json)

Other formats' folders are named here too (`ghsae export`, each layer's folder named by the
other library's name for the hookpoint, each with a README.md model card, and one for OUT):
SAELens  OUT/blocks.5.hook_resid_post/{cfg.json, sae_weights.safetensors, README.md}
sparsify OUT/layers.5/{cfg.json, sae.safetensors, README.md}
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.json"
PLAN_DIR = "plan"
PLAN_FILE = "plan.json"
TOKENS_FILE = "tokens.npy"
SIMILARITY_FILE = "similarity.npz"
ACTS_STORE = "acts.zarr"
MANIFEST_DIR = "manifest"
SAES_DIR = "saes"
SAE_WEIGHTS = "sae.safetensors"  # written last by `ghsae fit`, beside cfg.json
SAE_CONFIG = "cfg.json"  # the SAE's record: architecture, sizes, layers, provenance
SAE_FORMAT = "ghsae-sae"  # cfg.json's "format": sparsify names its files alike, with another layout
CHECKPOINT = "checkpoint.pt"
TRAINING_METRICS = "metrics.parquet"  # one row per logged training step
FIT_SETTINGS = "fit.json"  # in saes/: the [fit] settings the run's SAEs are trained with
REPORT_DIR = "report"
REPORT_PAGE = "report.html"
REPORT_METRICS = "metrics.parquet"  # one row per (seed, SAE, layer)
REPORT_SUMMARY = "summary.md"
REPORT_SETTINGS = "settings.json"  # the [report] settings (and fit seed) the report was made with
CIRCUITS = "circuits.parquet"
RATING_PAGE = "rating.html"
RATING_KEY = "rating-key.json"  # the one key of a run rated before each page had its own
RATING_KEY_PREFIX = "rating-key-"  # rating-key-<kit>.json: the key of the page with that kit id
RATING_SCORES = "ratings.json"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
MODEL_CARD = "README.md"  # in every exported folder and in OUT: the Hub shows it as the model card
STATS_FILE = "stats.json"
STATS_ARRAYS = "stats.npz"
STAGING_PREFIX = ".staging-"
MARKER_FILE = "ghsae-run.json"
DERIVED_FILE = "derived.json"  # a run derived from an all-layers run (harvest/derive.py): where from
PER_LAYER_DIR = "per-layer"  # the all-layers run a comparison (ghsae run with compare.per_layer) keeps inside
SEED_DIR_PREFIX = "seed"  # RUN/seed<s>/: seed s >= 1 of ghsae run's comparison (compare.seeds)
SEED_SUFFIX = "-seed"  # SWEEP/<grouping>-seed<s>/: seed s >= 1 of a sweep's grouping
LOCKS_DIR = ".locks"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # the name wandb gives the folder it makes in the `dir` it is given
RUN_FORMAT = "ghsae-run"
RUN_FORMAT_VERSION = 1
# Every top-level name ghsae writes in a run folder: --overwrite removes these and nothing else.
OWNED_NAMES = (
    CONFIG_FILE,
    PLAN_DIR,
    ACTS_STORE,
    MANIFEST_DIR,
    SAES_DIR,
    REPORT_DIR,
    MARKER_FILE,
    DERIVED_FILE,
    PER_LAYER_DIR,
    TENSORBOARD_DIR,
    WANDB_DIR,
)  # and RUN/seed<s>/ (SEED_DIR_PREFIX): a pattern, in RUN_TREE


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER_FILE

    @property
    def locks(self) -> Path:
        return self.root / LOCKS_DIR

    def lock(self, name: str) -> Path:
        return self.locks / f"{name}.lock"

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def derived_from(self) -> Path:
        return self.root / DERIVED_FILE

    @property
    def per_layer(self) -> Path:
        """The all-layers run kept inside this one for a comparison (its per-layer SAEs)."""
        return self.root / PER_LAYER_DIR

    def seed_run(self, seed: int) -> Path:
        """Seed `seed` of this run's comparison: the run itself for seed 0, else RUN/seed<s>/ (a run
        folder inside this one, so --overwrite and a moved copy take every seed with the run)."""
        return self.root if seed == 0 else self.root / f"{SEED_DIR_PREFIX}{seed}"

    def seed_runs(self) -> list[Path]:
        """RUN/seed1, RUN/seed2, ... as far as they are planned (the extra seeds this run holds)."""
        out: list[Path] = []
        while RunLayout(self.seed_run(len(out) + 1)).plan.is_file():
            out.append(self.seed_run(len(out) + 1))
        return out

    @property
    def plan_dir(self) -> Path:
        return self.root / PLAN_DIR

    @property
    def plan(self) -> Path:
        return self.plan_dir / PLAN_FILE

    @property
    def tokens(self) -> Path:
        return self.plan_dir / TOKENS_FILE

    @property
    def similarity(self) -> Path:
        return self.plan_dir / SIMILARITY_FILE

    @property
    def acts(self) -> Path:
        return self.root / ACTS_STORE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_DIR

    @property
    def stats(self) -> Path:
        return self.manifest / STATS_FILE

    @property
    def stats_arrays(self) -> Path:
        return self.manifest / STATS_ARRAYS

    @property
    def saes(self) -> Path:
        return self.root / SAES_DIR

    def sae_dir(self, group: str) -> Path:
        return self.saes / group

    def sae_trained(self, group: str) -> bool:
        """A group's SAE is done once its final weights exist (checkpoints alone do not count)."""
        return sae_weights(self.sae_dir(group)).is_file()

    @property
    def fit_settings(self) -> Path:
        return self.saes / FIT_SETTINGS

    def tensorboard(self, group: str) -> Path:
        """TensorBoard's event files of one SAE's training."""
        return self.root / TENSORBOARD_DIR / group

    @property
    def wandb(self) -> Path:
        return self.root / WANDB_DIR

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    def report_file(self, name: str) -> Path:
        """A file of RUN/report/ (name: one of the REPORT_* / RATING_* / CIRCUITS constants)."""
        return self.report / name

    def rating_key(self, kit: str) -> Path:
        """The key of the rating page with this kit id (each page keeps its own, so a second page
        never replaces the first one's)."""
        return self.report / f"{RATING_KEY_PREFIX}{kit}.json"

    def shard_record(self, shard: int) -> Path:
        return self.manifest / f"shard-{shard:05d}.json"

    def shard_sums(self, shard: int) -> Path:
        return self.manifest / f"shard-{shard:05d}.npz"

    def staging(self, tag: str) -> Path:
        """A private scratch folder; renamed into place when complete, so readers never see half a file.

        The name is `.staging-<tag>-<pid>-<random>`: the pid lets a later harvest remove what a killed
        process of this host left (harvest.steps), the random part keeps concurrent jobs apart."""
        return self.root / f"{STAGING_PREFIX}{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def seed_name(name: str, seed: int) -> str:
    """A sweep's folder for seed `seed` of grouping `name`: the grouping's own name for seed 0 (a sweep
    without --seeds is unchanged), `<name>-seed<s>` beside it for the others."""
    return name if seed == 0 else f"{name}{SEED_SUFFIX}{seed}"


def group_name(index: int) -> str:
    return f"group_{index:02d}"


# --- an SAE folder (RUN/saes/<group>/, or any folder `ghsae fit` wrote) -------------------------


def sae_config(folder: Path) -> Path:
    return folder / SAE_CONFIG


def sae_weights(folder: Path) -> Path:
    return folder / SAE_WEIGHTS


def sae_checkpoint(folder: Path) -> Path:
    return folder / CHECKPOINT


def sae_training_metrics(folder: Path) -> Path:
    return folder / TRAINING_METRICS


SAE_FILES = (SAE_WEIGHTS, SAE_CONFIG, CHECKPOINT, TRAINING_METRICS)
"""Every file ghsae writes in an SAE folder (what `fit --overwrite` removes, and nothing else)."""


# --- a sweep folder (ghsae/sweep.py) ---------------------------------------------------------------

SWEEP_MARKER = "ghsae-sweep.json"
SWEEP_PAGE = "sweep.html"
SWEEP_METRICS = "metrics.parquet"  # one row per (grouping, seed, SAE, layer)
SWEEP_SUMMARY = "summary.md"
SWEEP_EVAL_CACHE = "evaluation.npz"
TRANSFER_SUFFIX = "-transfer"  # SWEEP/G<n>-transfer: grouping G<n> trained again with fit.transfer
SWEEP_LR_CHOICE = "lr-choice.json"
LR_DIR = "lr-grid"  # SWEEP/lr-grid/<arm>-t<tokens>-lr<lr>/: each arm trained at each rate of compare.lr_grid


def budget_name(name: str, tokens: int | None) -> str:
    """A grouping's name at one budget of tokens per SAE (`<name>-t<tokens>`); without budgets, its own."""
    return name if tokens is None else f"{name}-t{tokens}"


@dataclass(frozen=True)
class SweepLayout:
    """SWEEP/ghsae-sweep.json, SWEEP/per-layer/ (the all-layers run), SWEEP/G<n>/ and
    SWEEP/G<n>-transfer/ (derived runs), SWEEP/<name>-seed<s>/ (seed s >= 1 of each: G<n>-seed<s> derived
    with the seed's layer draw, per-layer-seed<s> hard links to per-layer's store), SWEEP/report/ (the
    page, its figures, the parquet)."""

    root: Path

    @property
    def marker(self) -> Path:
        return self.root / SWEEP_MARKER

    @property
    def per_layer(self) -> Path:
        return self.root / PER_LAYER_DIR

    def grouping(self, name: str, seed: int = 0) -> Path:
        """SWEEP/<name>/ for seed 0 (per-layer: the all-layers run), SWEEP/<name>-seed<s>/ for seed s."""
        return self.root / seed_name(name, seed)

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    def figure(self, metric: str) -> Path:
        """A metric's figure against G and compute, as a PNG beside the page (for docs to quote)."""
        return self.report / f"{metric}.png"

    @property
    def lr_choice(self) -> Path:
        return self.root / SWEEP_LR_CHOICE

    def lr_run(self, name: str, tokens: int, lr: float) -> Path:
        """SWEEP/lr-grid/<name>-t<tokens>-lr<lr>/: arm `name` trained at one rate of the grid."""
        return self.root / LR_DIR / f"{budget_name(name, tokens)}-lr{lr:g}"

    @property
    def eval_cache(self) -> Path:
        """The evaluation of every grouping's SAEs, kept so a re-run re-renders without evaluating."""
        return self.report / SWEEP_EVAL_CACHE


def export_folder(out: Path, hookpoint_name: str) -> Path:
    """OUT/<name>: one exported layer, named as the target library names the hookpoint."""
    return out / hookpoint_name


# --- what ghsae writes, as a tree (what --overwrite removes, and nothing else) --------------------

OwnedTree = dict[str, "OwnedTree | None"]
"""fnmatch patterns of the names ghsae writes in a folder, the first match deciding: a pattern maps
to None (a file, or a folder ghsae writes whole) or to the tree of what ghsae writes inside that
folder. Anything no pattern matches is the user's, and `--overwrite` keeps it."""

_TEMPORARIES: OwnedTree = {".*.tmp": None, f"{STAGING_PREFIX}*": None}  # atomic.py's temporaries, staging folders
SAE_TREE: OwnedTree = {**dict.fromkeys(SAE_FILES), **_TEMPORARIES}
# a Zarr v3 store: zarr.json at each level, a group per SAE group, an array per field, its chunks in c/
_ZARR_TREE: OwnedTree = {"zarr.json": None, "*": {"zarr.json": None, "*": {"zarr.json": None, "c": None}}}
_REPORT_FILES = (REPORT_PAGE, REPORT_METRICS, REPORT_SUMMARY, REPORT_SETTINGS, CIRCUITS, RATING_PAGE, RATING_SCORES)
RUN_TREE: OwnedTree = {
    CONFIG_FILE: None,
    MARKER_FILE: None,
    DERIVED_FILE: None,
    PLAN_DIR: {PLAN_FILE: None, TOKENS_FILE: None, SIMILARITY_FILE: None, **_TEMPORARIES},
    ACTS_STORE: {**_TEMPORARIES, **_ZARR_TREE},
    MANIFEST_DIR: {"shard-*.json": None, "shard-*.npz": None, STATS_FILE: None, STATS_ARRAYS: None, **_TEMPORARIES},
    SAES_DIR: {FIT_SETTINGS: None, "group_*": SAE_TREE, **_TEMPORARIES},
    REPORT_DIR: {**dict.fromkeys(_REPORT_FILES), RATING_KEY: None, f"{RATING_KEY_PREFIX}*.json": None, **_TEMPORARIES},
    TENSORBOARD_DIR: None,  # logs of the SAEs --overwrite trains again
    WANDB_DIR: None,
    **_TEMPORARIES,
}
RUN_TREE[PER_LAYER_DIR] = RUN_TREE  # the all-layers run kept inside a comparison is a run folder too
RUN_TREE[f"{SEED_DIR_PREFIX}[0-9]*"] = RUN_TREE  # and so is each extra seed of it
assert set(OWNED_NAMES) <= set(RUN_TREE), "every top-level name ghsae writes has its tree"

REBUILT_WHOLE = (PLAN_DIR, ACTS_STORE)
"""Folders a harvest replaces whole by renaming a finished staging folder over them: a file of the
user's left in one would be deleted with it or would block the rename, so --overwrite refuses instead."""

SWEEP_FIGURES = (
    *(f"{m}{v}.png" for m in ("fvu", "delta_ce_pct", "kl") for v in ("_typical", "")),
    "gap_budget.png",  # analysis/sweep_page.BUDGET_FIGURE
)  # SweepLayout.figure of each metric in analysis/metric_table.SWEEP (checked by a test)
SWEEP_REPORT_TREE: OwnedTree = {
    **dict.fromkeys((SWEEP_PAGE, SWEEP_METRICS, SWEEP_SUMMARY, SWEEP_EVAL_CACHE, *SWEEP_FIGURES)),
    **_TEMPORARIES,
}
