"""A run folder, opened: its saved settings, plan, shard records, store and SAEs.

    run = Run.open("runs/default")
    run.plan.groups, run.done_shards(), run.shard_record(0).groups["group_00"].rows
    run.settings()              the PipelineConfig the run was made with (harvest + its fit settings)
    run.sae("group_00")         a trained SAE, loaded
    run.info()                  what `ghsae info` prints

Every stage after the plan works through a Run: fit, report, export, info, the harvest's shard
phase. Records are read through ghsae.records (typed, checked) and cached per Run; a Run never
writes except where a method says so (the statistics, forgetting a shard, the fit settings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ghsae.cache.norms import NormDistribution
from ghsae.cache.stats import NormStats, add_up
from ghsae.cache.store import ROW_METADATA_BYTES, ActivationStore, bytes_on_disk, damaged_metadata, repair_hint
from ghsae.config import PipelineConfig, config_from_run
from ghsae.errors import ConfigError, DamagedFileError, StoreError
from ghsae.layout import LOCKS_DIR, RunLayout, SweepLayout, sae_config, sae_weights
from ghsae.records import FitSettings, Plan, RunConfig, RunStats, SAERecord, ShardRecord, load_record, save_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What a run folder holds: progress, sizes, and what a per-layer cache would take."""

    run_dir: str
    model: str
    layers: list[int]
    groups: list[list[int]]
    group_names: list[str]
    shards_done: int
    shards_total: int
    shards_missing: list[int]
    rows_per_group: dict[str, int]
    rows_per_layer: dict[str, int]
    tokens: int  # stored token positions (one row per group each)
    bytes_on_disk: int
    per_layer_bytes_per_token: int  # a cache of every layer, uncompressed
    saes_trained: list[str]
    saes_missing: list[str]
    layer_norm_stats: dict | None
    store_problems: list[str] = field(default_factory=list)  # lost metadata: no shard readable until repaired
    hookpoint: str = "resid_post"  # which activation of each layer the store holds (plan.hookpoint)

    @property
    def complete(self) -> bool:
        return self.shards_done == self.shards_total and not self.store_problems

    @property
    def rows(self) -> int:
        return sum(self.rows_per_group.values())

    @property
    def bytes_per_token(self) -> float | None:
        return self.bytes_on_disk / self.tokens if self.tokens else None

    @property
    def storage_ratio(self) -> float | None:
        """How many times smaller the store is than a cache of every layer."""
        per_token = self.bytes_per_token
        return self.per_layer_bytes_per_token / per_token if per_token else None

    def to_json(self) -> dict[str, Any]:
        """`ghsae info --json`: every field and derived figure, under stable keys."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(
            complete=self.complete,
            rows=self.rows,
            bytes_per_token=self.bytes_per_token,
            storage_ratio=self.storage_ratio,
        )
        return out


def not_a_run(layout: RunLayout) -> str:
    """Why a folder without a plan cannot be opened as a run: what it is instead, and what to pass."""
    root = layout.root
    if SweepLayout(root).marker.is_file():
        runs = sorted(str(p) for p in root.iterdir() if RunLayout(p).plan.is_file())
        return f"{root} is a sweep folder, not a run; pass one of its runs: {', '.join(runs) or 'none planned yet'}"
    if sae_weights(root).is_file() or sae_config(root).is_file():
        return f"{root} is an SAE folder, not a run; pass the run folder it belongs to ({root.parent.parent})"
    model_files = sorted(p.name for p in root.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf"))
    if model_files and not layout.marker.is_file():
        return (
            f"{root} is a model folder ({', '.join(model_files[:3])}), not a run; harvest it into a run first: "
            f"`ghsae harvest --model {root} --run-dir NEW_RUN`, then pass NEW_RUN"
        )
    if not layout.marker.is_file() and root.is_dir() and any(p.name != LOCKS_DIR for p in root.iterdir()):
        return f"{root} is not a ghsae run (no {layout.marker.name}, no plan); pass a folder `ghsae harvest --run-dir` made"
    return (
        f"{root} has no plan ({layout.plan}); run `ghsae harvest --run-dir {root}` (with the run's config) to make it"
    )


class Run:
    """One run folder with a plan. Open it with `Run.open(path)` (or `ghsae.open_run`)."""

    def __init__(self, layout: RunLayout, plan: Plan):
        self.layout = layout
        self.plan = plan
        self._records: dict[int, ShardRecord] = {}

    @classmethod
    def open(cls, path: str | Path) -> Run:
        layout = RunLayout(Path(path))
        if not layout.plan.is_file():
            raise StoreError(not_a_run(layout))
        return cls(layout, load_record(Plan, layout.plan))

    @property
    def root(self) -> Path:
        return self.layout.root

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}: {len(self.plan.layers)} layers in {len(self.plan.groups)} groups)"

    # --- settings -------------------------------------------------------------------------------

    @cached_property
    def config(self) -> RunConfig:
        """config.json: what the harvest was run with; refused, naming it and the fix, when missing or
        damaged (it holds the run's settings: no command guesses them)."""
        fix = (
            "it holds the run's settings: restore it, or rewrite it with `ghsae harvest --run-dir "
            f"{self.root} --config PIPELINE.toml` given the config the run was harvested with (checked against "
            "the plan; nothing else is rewritten)"
        )
        if not self.layout.config.is_file():
            raise DamagedFileError(f"{self.layout.config} is missing; {fix}")
        return load_record(RunConfig, self.layout.config, fix=fix)

    def fit_settings(self) -> FitSettings | None:
        """saes/fit.json, once `ghsae fit` has run (None before)."""
        path = self.layout.fit_settings
        return load_record(FitSettings, path, fix=f"delete it and re-run `ghsae fit --run-dir {self.root}`") if path.is_file() else None

    def save_fit_settings(self, cfg: PipelineConfig) -> None:
        self.layout.saes.mkdir(exist_ok=True)
        save_record(self.layout.fit_settings, FitSettings(cfg.to_dict()["fit"]))

    def settings(self) -> PipelineConfig:
        """The run's own settings: the harvest's resolved config, with [fit] as its SAEs are trained
        (saes/fit.json) once fit has run. Commands start from these, not from the default
        pipeline.toml; --config and flags override them."""
        raw = {k: dict(v) for k, v in self.config.resolved.items()}
        fitted = self.fit_settings()
        if fitted is not None:
            raw["fit"] = dict(fitted.fit)
        return config_from_run(raw, source=str(self.layout.config))

    # --- tokens ---------------------------------------------------------------------------------

    def tokens(self) -> np.ndarray:
        """plan/tokens.npy, memory-mapped: [n_contexts, context_length] int32."""
        if not self.layout.tokens.is_file():
            raise StoreError(
                f"{self.layout.tokens} is missing; re-run `ghsae harvest --run-dir {self.root}` with the run's config "
                "to rebuild the plan (it is a pure function of the config and dataset)"
            )
        return np.load(self.layout.tokens, mmap_mode="r")

    def eval_contexts(self) -> np.ndarray:
        """The held-out contexts [n_eval, context_length] (tokens.npy after the harvested rows)."""
        if self.plan.n_contexts_eval == 0:
            raise ConfigError(
                f"{self.root} holds no held-out tokens (harvest.eval_tokens was 0); the report evaluates on them. "
                "Harvest again with harvest.eval_tokens > 0"
            )
        start, stop = self.plan.eval_contexts
        return np.array(self.tokens()[start:stop])  # a private, writable copy (torch.from_numpy needs one)

    # --- shards ---------------------------------------------------------------------------------

    def shard_done(self, shard: int) -> bool:
        return self.layout.shard_record(shard).is_file()

    def done_shards(self) -> list[int]:
        return [s for s in range(self.plan.n_shards) if self.shard_done(s)]

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.plan.n_shards) if not self.shard_done(s)]

    def complete(self) -> bool:
        return all(self.shard_done(s) for s in range(self.plan.n_shards))

    def shard_record(self, shard: int) -> ShardRecord:
        """A done shard's record (read once per Run), refused when it belongs to another config."""
        if shard in self._records:
            return self._records[shard]
        path = self.layout.shard_record(shard)
        if not path.is_file():
            raise StoreError(
                f"shard {shard} of {self.root} is not done (no {path.name}); re-run `ghsae harvest` to finish it"
            )
        record = load_record(ShardRecord, path, fix=f"re-run `ghsae harvest --run-dir {self.root}` to rewrite shard {shard}")
        if record.config_hash != self.plan.config_hash:
            raise StoreError(
                f"{path} was written by config {record.config_hash} but this run is {self.plan.config_hash}; "
                "the record does not belong to this run: delete it and re-run `ghsae harvest`"
            )
        self._records[shard] = record
        return record

    def forget_shard(self, shard: int) -> None:
        """Drop a shard's record (and sums) so the next harvest writes the shard again."""
        self._records.pop(shard, None)
        self.layout.stats.unlink(missing_ok=True)  # over every shard: no longer this run's until rewritten
        self.layout.stats_arrays.unlink(missing_ok=True)
        self.layout.shard_record(shard).unlink(missing_ok=True)
        self.layout.shard_sums(shard).unlink(missing_ok=True)

    def group_rows(self, group: str, shards: list[int]) -> dict[int, int]:
        """Valid rows of `group` in each of `shards`, from their records."""
        return {s: self.shard_record(s).groups[group].rows for s in shards}

    def harvested_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of the contexts of every done shard, from its record."""
        return [self.shard_record(s).contexts for s in self.done_shards()]

    def harvest_seconds(self) -> float | None:
        """A: the measured wall time of the plan step plus every shard (None when not all recorded)."""
        shards = [self.shard_record(s).seconds for s in range(self.plan.n_shards)] if self.complete() else [None]
        if self.plan.seconds is None or any(s is None for s in shards):
            return None
        return float(self.plan.seconds) + float(sum(s for s in shards if s is not None))

    @cached_property
    def store(self) -> ActivationStore:
        return ActivationStore.open(self.layout.acts)

    def norm_stats(self, shards: list[int] | None = None) -> NormStats:
        """Per-layer statistics over `shards` (default: every done shard): the harvest's statistics
        file when they are every shard of the run, else added up from their records and sums."""
        shards = self.done_shards() if shards is None else shards
        if sorted(shards) == list(range(self.plan.n_shards)):
            saved = self.saved_stats()
            if saved is not None:
                return saved
        return self.add_up_stats(shards)

    def add_up_stats(self, shards: list[int]) -> NormStats:
        """Per-layer statistics added up over `shards`' records and sums files."""
        records = [self.shard_record(s) for s in shards]
        return add_up(self.plan.layers, records, [self.layout.shard_sums(s) for s in shards])

    def saved_stats(self) -> NormStats | None:
        """The statistics manifest/stats.json and stats.npz hold (what write_stats added up over every
        shard), or None where they are absent or from another config."""
        stats = self.run_stats() if self.layout.stats_arrays.is_file() else None
        if stats is None or stats.config_hash != self.plan.config_hash or not self.complete():
            return None
        layers = list(self.plan.layers)
        rows = [stats.layers[layer] for layer in layers]
        with np.load(self.layout.stats_arrays) as z:
            if [int(x) for x in z["layers"]] != layers:
                return None
            mean = np.array(z["mean"])
        return NormStats(
            layers,
            np.array([float(r.count) for r in rows]),
            np.array([r.mean_norm for r in rows], dtype=np.float64),
            np.array([r.mean_sq_norm for r in rows], dtype=np.float64),
            mean,
            self.norm_distribution(),
        )

    def finish(self, wrote: bool) -> None:
        """The one ending of a harvest or derivation: once every shard is done, the per-layer
        statistics (again whenever this job wrote a shard, since a rewritten shard changes them)."""
        if self.complete() and (wrote or not self.layout.stats.is_file()):
            self.write_stats()

    def write_stats(self) -> NormStats:
        """manifest/stats.json (+ .npz with the means and scales), over every shard."""
        from ghsae.atomic import save_npz_atomic

        stats = self.add_up_stats(list(range(self.plan.n_shards)))
        d = self.plan.d_model
        norms = {} if stats.norms is None else {"norm_hist": stats.norms.hist, "max_norm": stats.norms.max_norm}
        save_npz_atomic(
            self.layout.stats_arrays, layers=np.array(stats.layers), mean=stats.mean, scale=stats.scale(d), **norms
        )
        save_record(self.layout.stats, stats.record(self.plan.config_hash, d))
        return stats

    def norm_distribution(self) -> NormDistribution | None:
        """Each layer's token-norm distribution from manifest/stats.npz (None for a run harvested
        before norms were counted, or before its statistics were written)."""
        if not self.layout.stats_arrays.is_file():
            return None
        with np.load(self.layout.stats_arrays) as z:
            if "norm_hist" not in z.files:
                return None
            return NormDistribution([int(x) for x in z["layers"]], z["norm_hist"], z["max_norm"])

    def run_stats(self) -> RunStats | None:
        return load_record(RunStats, self.layout.stats) if self.layout.stats.is_file() else None

    def verifier(self):
        """A cache.verify.ShardVerifier of this run's store: checks each shard the first time it is read."""
        from ghsae.cache.verify import ShardVerifier

        return ShardVerifier(self.store, self.plan, self.shard_record)

    def failing_shards(self, shards: list[int], *, once: bool = False) -> dict[int, str]:
        """shard -> the first problem found, for those of `shards` (all recorded done) that fail verification.
        `once`: skip the shards this process has verified already (cache.verify.verify_once)."""
        from ghsae.cache.verify import verify_once, verify_shard

        check = verify_once if once else verify_shard
        bad: dict[int, str] = {}
        for s in shards:
            try:
                record = self.shard_record(s)
                if not self.layout.shard_sums(s).is_file():
                    raise StoreError(f"{self.layout.shard_sums(s)} is missing")
                for group in self.plan.group_names:
                    check(self.store, self.plan, group, s, record)
            except (StoreError, DamagedFileError) as e:
                bad[s] = str(e)
        return bad

    def check_records(self) -> None:
        """Raise unless what a reader of the records (not of the store) relies on holds: config.json,
        tokens.npy, and every done shard's record (readable, this run's, finite norm sums). Reads no
        activation, so it holds with acts.zarr gone; `verify` checks the store's bytes."""
        from ghsae.cache.verify import nonfinite_sums

        self.config  # noqa: B018 - reading it raises DamagedFileError for a damaged config.json
        self.tokens()
        for s in self.done_shards():
            problem = nonfinite_sums(self.shard_record(s), self.plan.layers)
            if problem:
                raise StoreError(
                    f"shard {s} of {self.root}: {problem}; re-run `ghsae harvest --run-dir {self.root}` (same config) "
                    "to rewrite it (the harvest then stops with the cause and its fix)"
                )

    def store_problems(self) -> list[str]:
        """The store's missing or damaged metadata (zarr.json of the root, a group or an array): without
        it no shard can be read, however complete the records say the run is. Reads no shard."""
        if not self.layout.acts.is_dir():
            return []
        lost = damaged_metadata(self.layout.acts, list(self.plan.group_names))
        return [f"{p} is missing or damaged; {repair_hint(self.layout.acts)}" for p in lost]

    def verify(self) -> tuple[list[str], int]:
        """Check every file the store's readers rely on; returns (problems, shards checked). Writes
        nothing. `verify_saes` checks the SAE folders too (what `ghsae verify` runs)."""
        problems: list[str] = []
        for path in (self.layout.config, self.layout.tokens, self.layout.similarity):
            if not path.is_file():
                problems.append(f"{path} is missing; re-run `ghsae harvest --run-dir {self.root}` to rebuild it")
        if self.layout.config.is_file():
            try:
                load_record(RunConfig, self.layout.config)
            except DamagedFileError as e:
                problems.append(str(e))
        lost = self.store_problems()
        if lost:
            return [*problems, *lost], 0
        done = self.done_shards()
        problems += [f"shard {s}: {msg}" for s, msg in self.failing_shards(done).items()]
        return problems, len(done)

    def verify_saes(self) -> tuple[list[str], int]:
        """Load every trained SAE folder (cfg.json against the weights, and the weights against the
        checksum cfg.json records); returns (problems, folders). An SAE fitted before checksums were
        recorded loads unchecked, with a warning that says so."""
        from ghsae.errors import GhsaeError
        from ghsae.sae import load_sae

        saes = self.layout.saes
        folders = sorted(p for p in saes.iterdir() if p.is_dir()) if saes.is_dir() else []
        problems = []
        for folder in folders:
            if not self.layout.sae_trained(folder.name):
                continue
            try:
                load_sae(folder)
                if load_record(SAERecord, sae_config(folder)).weights is None:
                    log.warning("%s records no checksum of its weights (fitted by an older ghsae): unchecked", folder)
            except GhsaeError as e:
                problems.append(str(e))
        return problems, len(folders)

    # --- the model ----------------------------------------------------------------------------

    def model(self, device: str = "auto", dtype: str | None = None):
        """The language model this run was harvested from (a ghsae.lm.LoadedModel, loaded once per
        process), in the run's compute dtype unless `dtype`; refused if its weights changed since."""
        from ghsae.lm import cached_model

        settings = self.settings().model
        lm = cached_model(settings.path, device, dtype or settings.dtype)
        lm.check_matches(
            self.plan.model,
            fix=f"Restore the model {self.root} was harvested with ({settings.path}), or harvest a new run with this one",
        )
        return lm

    # --- SAEs -----------------------------------------------------------------------------------

    def sae_trained(self, group: str) -> bool:
        return self.layout.sae_trained(group)

    def trained_groups(self) -> list[str]:
        return [g for g in self.plan.group_names if self.sae_trained(g)]

    def sae_record(self, group: str) -> SAERecord:
        folder = self.layout.sae_dir(group)
        return load_record(SAERecord, sae_config(folder), fix=f"delete {folder} and re-run `ghsae fit` for it")

    def sae(self, group: str, device: str = "cpu"):
        """The trained SAE of `group` (a ghsae.sae.SparseAutoencoder), on `device`."""
        from ghsae.sae import load_sae

        self.check_group(group)
        if not self.sae_trained(group):
            raise StoreError(f"{self.root} has no trained SAE for {group}; run `ghsae fit --run-dir {self.root}`")
        return load_sae(self.layout.sae_dir(group), device=device)

    def sae_for_layer(self, layer: int, device: str = "cpu"):
        """The SAE that serves `layer` (the one of its group)."""
        if layer not in self.plan.layers:
            raise ConfigError(f"layer {layer} is not harvested in {self.root}; it has layers {self.plan.layers[0]}..{self.plan.layers[-1]}")
        return self.sae(self.plan.group_of_layer(layer), device)

    def check_group(self, group: str, option: str = "") -> None:
        """Refuse a group name the run does not have (`option`: the flag it came from, e.g. "--group ")."""
        if group not in self.plan.group_names:
            raise ConfigError(f"{option}{group} is not in {self.root}; it has {', '.join(self.plan.group_names)}")

    # --- what `ghsae info` says ---------------------------------------------------------------

    def info(self) -> RunInfo:
        self.config  # noqa: B018 - a run without its settings is refused, not described as complete
        plan = self.plan
        done = self.done_shards()
        rows_per_group = {name: 0 for name in plan.group_names}
        rows_per_layer = {str(layer): 0 for layer in plan.layers}
        tokens = 0
        for s in done:
            record = self.shard_record(s)
            tokens += record.stored_tokens
            for name, g in record.groups.items():
                rows_per_group[name] += g.rows
                for layer, c in g.layer_counts.items():
                    rows_per_layer[str(layer)] += c
        store_bytes = bytes_on_disk(self.layout.acts) if self.layout.acts.is_dir() else 0
        stats = self.run_stats()
        return RunInfo(
            run_dir=str(self.root),
            model=plan.model.source,
            layers=list(plan.layers),
            groups=[list(g) for g in plan.groups],
            group_names=list(plan.group_names),
            shards_done=len(done),
            shards_total=plan.n_shards,
            shards_missing=self.missing_shards(),
            rows_per_group=rows_per_group,
            rows_per_layer=rows_per_layer,
            tokens=tokens,
            bytes_on_disk=store_bytes,
            per_layer_bytes_per_token=len(plan.layers) * (plan.d_model * 2 + ROW_METADATA_BYTES),
            saes_trained=self.trained_groups(),
            saes_missing=[g for g in plan.group_names if not self.sae_trained(g)],
            layer_norm_stats={str(k): v.to_json() for k, v in stats.layers.items()} if stats else None,
            store_problems=self.store_problems(),
            hookpoint=plan.hookpoint,
        )


def open_run(path: str | Path) -> Run:
    """Open a run folder made by `ghsae harvest` (and fitted by `ghsae fit`)."""
    return Run.open(path)
