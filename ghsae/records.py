"""Every JSON record a run stores, typed: the one module that reads or writes their keys.

    ghsae-run.json            RunMarker        this folder is a run, of which format version
    config.json               RunConfig        the harvest's config: identity, resolved settings, hash
    plan/plan.json            Plan             groups, shard geometry, fingerprints (ModelIdentity, ...)
    manifest/shard-N.json     ShardRecord      one done shard: rows, layer counts, checksums per group
    manifest/stats.json       RunStats         per-layer normalisation statistics over every shard
    derived.json              DerivedFrom      the all-layers run a derived run was gathered from
    SWEEP/ghsae-sweep.json    SweepRecord      a sweep folder and its groupings
    SWEEP/lr-choice.json      LrChoiceRecord   each arm's learning rate, from the validation split
    saes/fit.json             FitSettings      the [fit] settings the run's SAEs are trained with
    saes/<group>/cfg.json     SAERecord        one SAE: its config, the fit settings and store it came from,
                                               its weights file's size and SHA-256 (WeightsDigest)
    report/settings.json      ReportSettings   what the last report was made with
    report/rating-key-<kit>.json RatingKey     a blind rating page's key (ids -> SAE, layer, latent), one
                                               per page (rating-key.json in runs rated before that)
    report/ratings.json       RatingScores     scored ratings

Each record is a frozen dataclass with `from_json(obj)` and `to_json()`; code elsewhere uses
fields, never `data["key"]`. `to_json` gives back exactly the dict ghsae has always written, so a
record read and written again is the same bytes (tests/integration/test_stored_run.py pins them).

Versions: the run marker carries the run format version (layout.RUN_FORMAT_VERSION) that every
record of the run follows; version 1 records carry no version key of their own (they predate
this module). A record holding a "version" newer than this ghsae reads is refused by
`from_json`, so a newer format is never misread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ghsae.atomic import read_json, write_json_atomic
from ghsae.errors import DamagedFileError
from ghsae.layout import SAE_FORMAT

RECORD_VERSION = 1
STATS_FROM_STORED = "stored-rows"  # a plan's per-layer sums are of the rows as stored (a derived run reproduces them)
STATS_FROM_MODEL = "model-output"  # ... of the model's output before the cast (older plans)
HOOKPOINT_DEFAULT = "resid_post"  # a plan or SAE record without a hookpoint stored the block outputs


def _check_version(obj: Any, what: str) -> dict:
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{what} is not a JSON object (found {type(obj).__name__})")
    version = obj.get("version", 1)
    if isinstance(version, int) and version > RECORD_VERSION:
        raise DamagedFileError(
            f"{what} has record version {version}; this ghsae reads version {RECORD_VERSION}: upgrade ghsae"
        )
    return obj


# --- the run folder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMarker:
    format: str
    version: int
    created: float

    @classmethod
    def from_json(cls, obj: Any) -> RunMarker:
        obj = obj if isinstance(obj, dict) else {}
        return cls(str(obj.get("format", "")), int(obj.get("version", 0)), float(obj.get("created", 0.0)))

    def to_json(self) -> dict:
        return {"format": self.format, "version": self.version, "created": self.created}


@dataclass(frozen=True)
class RunConfig:
    """config.json: the harvest's config. `identity` decides what the store holds (its hash names
    the run), `resolved` is every setting as harvest saw it, runtime ones included."""

    identity: Mapping[str, Any]
    resolved: Mapping[str, Any]
    hash: str

    @classmethod
    def from_json(cls, obj: Any) -> RunConfig:
        obj = _check_version(obj, "config.json")
        return cls(obj.get("identity", {}), obj.get("resolved", {}), str(obj.get("hash", "")))

    def to_json(self) -> dict:
        return {"identity": dict(self.identity), "resolved": dict(self.resolved), "hash": self.hash}


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    source: str  # what the user named: a folder, a .gguf file, a hub id, builtin:...
    fingerprint: str  # model.lm.model_fingerprint: config plus both ends of each weight file
    class_name: str  # the transformers class loaded (JSON key "class")
    revision: str | None = None  # a Hub id's commit in the local cache (absent for local models)

    @classmethod
    def from_json(cls, obj: Mapping) -> ModelIdentity:
        return cls(str(obj["source"]), str(obj["fingerprint"]), str(obj.get("class", "")), obj.get("revision"))

    def to_json(self) -> dict:
        out = {"source": self.source, "fingerprint": self.fingerprint, "class": self.class_name}
        if self.revision is not None:
            out["revision"] = self.revision
        return out


@dataclass(frozen=True)
class TokenizerIdentity:
    fingerprint: str
    bos: int | None  # prepended to every context (None: no BOS)
    eos: int | None  # between documents
    special_ids: tuple[int, ...]  # never stored, never evaluated

    @classmethod
    def from_json(cls, obj: Mapping) -> TokenizerIdentity:
        return cls(str(obj["fingerprint"]), obj.get("bos"), obj.get("eos"), tuple(obj.get("special_ids", ())))

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "bos": self.bos, "eos": self.eos, "special_ids": list(self.special_ids)}


@dataclass(frozen=True)
class DatasetIdentity:
    spec: str  # data.dataset as given
    fingerprint: str  # sha256 of the packed token array
    files: tuple[tuple[str, int], ...] | None = None  # (path, bytes) of each input file
    python: str | None = None  # the built-in corpus: the Python version whose docs it is
    revision: str | None = None  # a Hub dataset id's commit in the local cache

    @classmethod
    def from_json(cls, obj: Mapping) -> DatasetIdentity:
        files = obj.get("files")
        return cls(
            str(obj["spec"]),
            str(obj.get("fingerprint", "")),
            tuple((str(f), int(n)) for f, n in files) if files is not None else None,
            obj.get("python"),
            obj.get("revision"),
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {"spec": self.spec, "fingerprint": self.fingerprint}
        if self.files is not None:
            out["files"] = [[f, n] for f, n in self.files]
        if self.python is not None:
            out["python"] = self.python
        if self.revision is not None:
            out["revision"] = self.revision
        return out


@dataclass(frozen=True)
class GroupingRecord:
    """How the groups were chosen (JSON key "amad" of plan.json).

    With last_layer = own, the partition covers layers 0..L-2 of the L harvested layers and the last
    has a group of its own: the curves run over G = 1..L-1 and chosen_groups / chosen_amad count the
    groups of layers 0..L-2 only (the plan has chosen_groups + 1 groups)."""

    distance: str  # raw | layer-centred (or "centred", the older name, kept as written)
    method: str  # dp | agglomerative | reference
    threshold: float  # AMAD threshold of groups = auto
    objective: str  # what dp minimised (the other methods: their linkage)
    curve: tuple[float, ...]  # AMAD of the method's partition at G = 1..(layers partitioned)
    objective_curve: tuple[float, ...]  # the objective at the same G
    chosen_groups: int  # G: groups of the layers partitioned
    chosen_amad: float  # AMAD over those groups
    last_layer: str = "grouped"  # own | grouped (absent: plans made before, which partitioned every layer)

    @property
    def own_last_layer(self) -> bool:
        return self.last_layer == "own"

    def describe(self, layers: tuple[int, ...] | list[int]) -> str:
        """"G = 6 groups of layers 0..28, plus layer 29 on its own" (or "G = 6 groups of layers 0..29")."""
        partitioned = layers[:-1] if self.own_last_layer else layers
        text = f"G = {self.chosen_groups} group{'s' if self.chosen_groups != 1 else ''} of layers {partitioned[0]}..{partitioned[-1]}"
        return f"{text}, plus layer {layers[-1]} on its own" if self.own_last_layer else text

    @classmethod
    def from_json(cls, obj: Mapping) -> GroupingRecord:
        return cls(
            distance=str(obj["distance"]),
            method=str(obj.get("method", "dp")),  # plans made before grouping.method used the DP
            threshold=obj["threshold"],
            objective=str(obj.get("objective", "layer-mean")),
            curve=tuple(obj.get("curve", ())),
            objective_curve=tuple(obj.get("objective_curve", ())),
            chosen_groups=int(obj["chosen_groups"]),
            chosen_amad=obj["chosen_amad"],
            last_layer=str(obj.get("last_layer", "grouped")),
        )

    def to_json(self) -> dict:
        return {
            "distance": self.distance,
            "method": self.method,
            "threshold": self.threshold,
            "objective": self.objective,
            "curve": list(self.curve),
            "objective_curve": list(self.objective_curve),
            "chosen_groups": self.chosen_groups,
            "chosen_amad": self.chosen_amad,
            **({"last_layer": self.last_layer} if self.last_layer != "grouped" else {}),
        }


@dataclass(frozen=True)
class Plan:
    """plan/plan.json: everything fixed once per run before any shard is written."""

    config_hash: str
    model: ModelIdentity
    tokenizer: TokenizerIdentity
    dataset: DatasetIdentity
    n_layers_model: int
    d_model: int
    layers: tuple[int, ...]  # the harvested layers, in order
    groups: tuple[tuple[int, ...], ...]  # contiguous runs of `layers` (harvest.partition refuses others)
    group_names: tuple[str, ...]
    context_length: int
    n_contexts_harvest: int  # rows of tokens.npy that shards cover
    n_contexts_eval: int  # rows after them, held out for the report
    contexts_per_shard: int
    n_shards: int
    shard_rows: int  # row capacity of a shard in every group's arrays
    grouping: GroupingRecord
    probe_tokens: int
    seconds: float | None = None  # tokenise + probe + partition: part of the report's harvest cost A
    stats_from: str = STATS_FROM_MODEL  # what the shards' per-layer sums are taken of (absent: an older plan, model-output)
    hookpoint: str = HOOKPOINT_DEFAULT  # which activation of each layer is stored (harvest.hookpoint)

    @classmethod
    def from_json(cls, obj: Any) -> Plan:
        obj = _check_version(obj, "plan.json")
        return cls(
            config_hash=str(obj["config_hash"]),
            model=ModelIdentity.from_json(obj["model"]),
            tokenizer=TokenizerIdentity.from_json(obj["tokenizer"]),
            dataset=DatasetIdentity.from_json(obj["dataset"]),
            n_layers_model=int(obj["n_layers_model"]),
            d_model=int(obj["d_model"]),
            layers=tuple(int(x) for x in obj["layers"]),
            groups=tuple(tuple(int(x) for x in g) for g in obj["groups"]),
            group_names=tuple(obj["group_names"]),
            context_length=int(obj["context_length"]),
            n_contexts_harvest=int(obj["n_contexts_harvest"]),
            n_contexts_eval=int(obj.get("n_contexts_eval", 0)),
            contexts_per_shard=int(obj["contexts_per_shard"]),
            n_shards=int(obj["n_shards"]),
            shard_rows=int(obj["shard_rows"]),
            grouping=GroupingRecord.from_json(obj["amad"]),
            probe_tokens=int(obj.get("probe_tokens", 0)),
            seconds=obj.get("seconds"),
            stats_from=str(obj.get("stats_from", STATS_FROM_MODEL)),
            hookpoint=str(obj.get("hookpoint", HOOKPOINT_DEFAULT)),
        )

    def to_json(self) -> dict:
        out = {
            "config_hash": self.config_hash,
            "model": self.model.to_json(),
            "tokenizer": self.tokenizer.to_json(),
            "dataset": self.dataset.to_json(),
            "n_layers_model": self.n_layers_model,
            "d_model": self.d_model,
            "layers": list(self.layers),
            "groups": [list(g) for g in self.groups],
            "group_names": list(self.group_names),
            "context_length": self.context_length,
            "n_contexts_harvest": self.n_contexts_harvest,
            "n_contexts_eval": self.n_contexts_eval,
            "contexts_per_shard": self.contexts_per_shard,
            "n_shards": self.n_shards,
            "shard_rows": self.shard_rows,
            "amad": self.grouping.to_json(),
            "probe_tokens": self.probe_tokens,
        }
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.stats_from != STATS_FROM_MODEL:
            out["stats_from"] = self.stats_from
        if self.hookpoint != HOOKPOINT_DEFAULT:  # absent: resid_post, as in every plan made before hookpoints
            out["hookpoint"] = self.hookpoint
        return out

    # --- what the stages ask of it

    def shard_contexts(self, shard: int) -> tuple[int, int]:
        """[start, stop) of the rows of tokens.npy that shard `shard` covers."""
        start = shard * self.contexts_per_shard
        return start, min(start + self.contexts_per_shard, self.n_contexts_harvest)

    @property
    def eval_contexts(self) -> tuple[int, int]:
        """[start, stop) of the held-out rows of tokens.npy (after every harvested one)."""
        return self.n_contexts_harvest, self.n_contexts_harvest + self.n_contexts_eval

    def group_layers(self, group: str) -> tuple[int, ...]:
        return self.groups[self.group_names.index(group)]

    def group_of_layer(self, layer: int) -> str:
        return next(name for name, g in zip(self.group_names, self.groups) if layer in g)

    @property
    def per_layer(self) -> bool:
        """One layer per group: a per-layer baseline run."""
        return all(len(g) == 1 for g in self.groups)


# --- shards ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRows:
    """One group's rows in one shard, as its record describes them."""

    rows: int
    layer_counts: Mapping[int, int]  # rows drawn from each layer of the group
    checksums: Mapping[str, str]  # array name -> blake2b-128 of its valid rows
    files: Mapping[str, int] = field(default_factory=dict)  # array name -> shard-file bytes (absent in old records)

    @classmethod
    def from_json(cls, obj: Mapping) -> GroupRows:
        return cls(
            int(obj["rows"]),
            {int(k): int(v) for k, v in obj["layer_counts"].items()},
            dict(obj["checksums"]),
            {k: int(v) for k, v in obj.get("files", {}).items()},
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "rows": self.rows,
            "layer_counts": {str(k): v for k, v in self.layer_counts.items()},
            "checksums": dict(self.checksums),
        }
        if self.files:
            out["files"] = dict(self.files)
        return out


@dataclass(frozen=True)
class LayerSums:
    """Sums over one shard's rows of one layer (the normalisation statistics add these up)."""

    count: int
    sum_norm: float
    sum_sq_norm: float

    @classmethod
    def from_json(cls, obj: Mapping) -> LayerSums:
        return cls(int(obj["count"]), obj["sum_norm"], obj["sum_sq_norm"])

    def to_json(self) -> dict:
        return {"count": self.count, "sum_norm": self.sum_norm, "sum_sq_norm": self.sum_sq_norm}


@dataclass(frozen=True)
class ShardRecord:
    """manifest/shard-NNNNN.json: the only mark of a done shard, written last."""

    shard: int
    config_hash: str
    contexts: tuple[int, int]  # [start, stop) of tokens.npy rows the shard covers
    stored_tokens: int  # rows of every group (one per non-special token)
    groups: Mapping[str, GroupRows]
    layer_stats: Mapping[int, LayerSums]
    seconds: float | None = None  # the shard's forward pass, measured (part of A)
    written_at: float | None = None

    @classmethod
    def from_json(cls, obj: Any) -> ShardRecord:
        obj = _check_version(obj, "the shard record")
        return cls(
            shard=int(obj["shard"]),
            config_hash=str(obj["config_hash"]),
            contexts=(int(obj["contexts"][0]), int(obj["contexts"][1])),
            stored_tokens=int(obj["stored_tokens"]),
            groups={name: GroupRows.from_json(g) for name, g in obj["groups"].items()},
            layer_stats={int(k): LayerSums.from_json(v) for k, v in obj["layer_stats"].items()},
            seconds=obj.get("seconds"),
            written_at=obj.get("written_at"),
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "shard": self.shard,
            "config_hash": self.config_hash,
            "contexts": list(self.contexts),
            "stored_tokens": self.stored_tokens,
            "groups": {name: g.to_json() for name, g in self.groups.items()},
            "layer_stats": {str(k): v.to_json() for k, v in self.layer_stats.items()},
        }
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.written_at is not None:
            out["written_at"] = self.written_at
        return out


@dataclass(frozen=True)
class NormSummary:
    """A layer's token-norm distribution as stats.json records it (cache/norms.py): quantiles read
    off log-spaced bins 4.4 % wide, the largest norm exactly, and the outliers at the run's factor."""

    median_norm: float
    q99_norm: float
    q999_norm: float
    max_norm: float
    outliers: float  # tokens above outlier_factor x median_norm (a whole number, from the bins)

    @classmethod
    def from_json(cls, obj: Mapping) -> NormSummary:
        return cls(obj["median_norm"], obj["q99_norm"], obj["q999_norm"], obj["max_norm"], obj["outliers"])

    def to_json(self) -> dict:
        return {
            "median_norm": self.median_norm,
            "q99_norm": self.q99_norm,
            "q999_norm": self.q999_norm,
            "max_norm": self.max_norm,
            "outliers": self.outliers,
        }


@dataclass(frozen=True)
class LayerStats:
    count: int
    mean_norm: float
    mean_sq_norm: float
    scale: float  # sqrt(d) / E||x||, the per-layer normalisation factor
    norms: NormSummary | None = None  # absent in runs harvested before norms were counted

    @classmethod
    def from_json(cls, obj: Mapping) -> LayerStats:
        norms = NormSummary.from_json(obj["norms"]) if "norms" in obj else None
        return cls(int(obj["count"]), obj["mean_norm"], obj["mean_sq_norm"], obj["scale"], norms)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"count": self.count, "mean_norm": self.mean_norm, "mean_sq_norm": self.mean_sq_norm, "scale": self.scale}
        if self.norms is not None:
            out["norms"] = self.norms.to_json()
        return out


@dataclass(frozen=True)
class RunStats:
    """manifest/stats.json: per-layer statistics over every shard (written once all are done)."""

    config_hash: str
    d_model: int
    target_norm: float
    layers: Mapping[int, LayerStats]
    outlier_factor: float | None = None  # the factor the layers' outlier counts use

    @classmethod
    def from_json(cls, obj: Any) -> RunStats:
        obj = _check_version(obj, "stats.json")
        return cls(
            str(obj["config_hash"]),
            int(obj["d_model"]),
            obj["target_norm"],
            {int(k): LayerStats.from_json(v) for k, v in obj["layers"].items()},
            obj.get("outlier_factor"),
        )

    def to_json(self) -> dict:
        out = {
            "config_hash": self.config_hash,
            "d_model": self.d_model,
            "target_norm": self.target_norm,
            "layers": {str(k): v.to_json() for k, v in self.layers.items()},
        }
        if self.outlier_factor is not None:
            out["outlier_factor"] = self.outlier_factor
        return out


# --- SAEs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreState:
    """The store an SAE trained on: the harvest config, the shards, a digest of their checksums."""

    config_hash: str
    shards: tuple[int, ...]
    n_shards: int
    rows_digest: str

    @classmethod
    def from_json(cls, obj: Mapping) -> StoreState:
        return cls(str(obj["config_hash"]), tuple(obj["shards"]), int(obj["n_shards"]), str(obj["rows_digest"]))

    def to_json(self) -> dict:
        return {
            "config_hash": self.config_hash,
            "shards": list(self.shards),
            "n_shards": self.n_shards,
            "rows_digest": self.rows_digest,
        }


@dataclass(frozen=True)
class Provenance:
    """What an SAE was trained with: the fit settings that decide its weights, and the store."""

    fit: Mapping[str, Any]
    store: StoreState

    @classmethod
    def from_json(cls, obj: Mapping) -> Provenance:
        return cls(dict(obj["fit"]), StoreState.from_json(obj["store"]))

    def to_json(self) -> dict:
        return {"fit": dict(self.fit), "store": self.store.to_json()}


@dataclass(frozen=True)
class WeightsDigest:
    """The SAE's weights file as fit wrote it: its size and SHA-256, so a damaged file is refused."""

    size: int  # bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> WeightsDigest:
        return cls(len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def from_json(cls, obj: Mapping) -> WeightsDigest:
        return cls(int(obj["bytes"]), str(obj["sha256"]))

    def to_json(self) -> dict:
        return {"bytes": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class SAERecord:
    """saes/<group>/cfg.json: the SAE's config (SAEConfig's fields), and how it was trained."""

    sae: Mapping[str, Any]  # ghsae.sae.SAEConfig as JSON (its owner builds it back)
    fit: Mapping[str, Any] = field(default_factory=dict)  # the whole [fit] section it was trained with
    provenance: Provenance | None = None  # None: written by a ghsae before provenance existed
    tokens: int = 0  # training tokens seen
    steps: int = 0
    seconds: float | None = None  # training wall time, summed over resumed sessions (the report's T)
    weights: WeightsDigest | None = None  # None: written before checksums existed (loads unchecked)
    # "format" and "version" mark the folder as ghsae's to tools that know sparsify's file names
    # (cfg.json + sae.safetensors); None: written before the mark existed (loads the same)
    format: str | None = SAE_FORMAT
    version: int | None = RECORD_VERSION

    @classmethod
    def from_json(cls, obj: Any) -> SAERecord:
        obj = _check_version(obj, "the SAE's cfg.json")
        fmt = obj.get("format")
        if fmt is not None and fmt != SAE_FORMAT:
            raise DamagedFileError(f"its format is {fmt!r}, not a ghsae SAE folder ({SAE_FORMAT!r})")
        if "sae" not in obj and "d_in" in obj:  # sparsify's cfg.json, beside a sae.safetensors
            raise DamagedFileError(
                "it is a sparsify SAE folder (d_in, no sae field), not a ghsae one: "
                "open it with sparsify's SparseCoder.load_from_disk"
            )
        prov, weights = obj.get("provenance"), obj.get("weights")
        return cls(
            sae=obj["sae"],
            fit=obj.get("fit", {}),
            provenance=Provenance.from_json(prov) if prov is not None else None,
            tokens=int(obj.get("tokens", 0)),
            steps=int(obj.get("steps", 0)),
            seconds=obj.get("seconds"),
            weights=WeightsDigest.from_json(weights) if weights is not None else None,
            format=fmt,
            version=obj.get("version"),
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {"sae": dict(self.sae)}
        if self.format is not None:
            out["format"] = self.format
        if self.version is not None:
            out["version"] = self.version
        if self.fit:
            out["fit"] = dict(self.fit)
        if self.provenance is not None:
            out["provenance"] = self.provenance.to_json()
        out.update(tokens=self.tokens, steps=self.steps)
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.weights is not None:
            out["weights"] = self.weights.to_json()
        return out

    @property
    def layers(self) -> list[int]:
        return list(self.sae["layers"])

    @property
    def architecture(self) -> str:
        return str(self.sae["architecture"])


@dataclass(frozen=True)
class FitSettings:
    """saes/fit.json: the [fit] section the run's SAEs are trained with (fit reads it back, report
    takes its seed). Written by the first `ghsae fit`; another fit with other settings is refused
    unless --overwrite."""

    fit: Mapping[str, Any]

    @classmethod
    def from_json(cls, obj: Any) -> FitSettings:
        return cls(dict(_check_version(obj, "saes/fit.json")["fit"]))

    def to_json(self) -> dict:
        return {"fit": dict(self.fit)}


@dataclass(frozen=True)
class ReportSettings:
    """report/settings.json: the [report] section, the fit seed and the model settings the last
    report was made with."""

    report: Mapping[str, Any]
    seed: int
    model: Mapping[str, Any]
    baseline: str | None = None

    @classmethod
    def from_json(cls, obj: Any) -> ReportSettings:
        obj = _check_version(obj, "report/settings.json")
        return cls(dict(obj["report"]), int(obj["seed"]), dict(obj["model"]), obj.get("baseline"))

    def to_json(self) -> dict:
        return {"report": dict(self.report), "seed": self.seed, "model": dict(self.model), "baseline": self.baseline}


@dataclass(frozen=True)
class DerivedFrom:
    """derived.json: the all-layers run a grouped run's rows were gathered from (harvest/derive.py).
    No model ran for the derived run: the source's harvest is its model pass, and its own shard
    records' seconds are the derivation's."""

    source: str  # relative to the derived run where it can be (the pair moves together)
    source_config_hash: str

    @classmethod
    def from_json(cls, obj: Any) -> DerivedFrom:
        obj = _check_version(obj, "derived.json")
        return cls(str(obj["source"]), str(obj["source_config_hash"]))

    def to_json(self) -> dict:
        return {"source": self.source, "source_config_hash": self.source_config_hash}

    def source_path(self, run_root: Path) -> Path:
        return (run_root / self.source).resolve()


@dataclass(frozen=True)
class SweepRecord:
    """SWEEP/ghsae-sweep.json: this folder is a sweep (ghsae/sweep.py) of these groupings."""

    format: str
    version: int
    groupings: tuple[str, ...]  # as last given to --groups: numbers, auto, per-layer
    config_hash: str  # the harvest identity of the sweep's config
    created: float
    fit_hash: str = ""  # the fit settings every grouping trains with ("": not recorded)
    budgets: tuple[int, ...] = ()  # every tokens-per-SAE budget trained so far (--budgets), ascending
    harvest_tokens: int = 0  # tokens the one harvest holds (with budgets: the largest at creation; 0: not recorded)

    @classmethod
    def from_json(cls, obj: Any) -> SweepRecord:
        obj = _check_version(obj, "ghsae-sweep.json")
        return cls(
            str(obj["format"]),
            int(obj["version"]),
            tuple(obj["groupings"]),
            str(obj["config_hash"]),
            float(obj["created"]),
            str(obj.get("fit_hash", "")),
            tuple(int(b) for b in obj.get("budgets", ())),
            int(obj.get("harvest_tokens", 0)),
        )

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "version": self.version,
            "groupings": list(self.groupings),
            "config_hash": self.config_hash,
            "created": self.created,
            "fit_hash": self.fit_hash,
            "budgets": list(self.budgets),
            "harvest_tokens": self.harvest_tokens,
        }


@dataclass(frozen=True)
class LrChoiceRecord:
    """SWEEP/lr-choice.json: each arm's learning rate, picked on held-out contexts the evaluation never sees."""

    grid: tuple[float, ...]
    budget: int  # tokens per SAE the grid was trained at (the smallest budget)
    validation_contexts: tuple[int, int]  # [start, stop) rows of tokens.npy the choice is measured on
    eval_contexts: tuple[int, int]  # [start, stop) rows the sweep evaluates on (disjoint from the above)
    metric: str  # what was minimised, averaged over each arm's SAEs and layers
    scores: dict[str, tuple[float, ...]]  # arm -> its validation metric at each learning rate of the grid
    chosen: dict[str, float]  # arm -> the learning rate it trains with at every budget

    @classmethod
    def from_json(cls, obj: Any) -> LrChoiceRecord:
        obj = _check_version(obj, "lr-choice.json")
        v0, v1 = obj["validation_contexts"]
        e0, e1 = obj["eval_contexts"]
        return cls(
            tuple(float(x) for x in obj["grid"]),
            int(obj["budget"]),
            (int(v0), int(v1)),
            (int(e0), int(e1)),
            str(obj["metric"]),
            {str(k): tuple(float(x) for x in v) for k, v in obj["scores"].items()},
            {str(k): float(v) for k, v in obj["chosen"].items()},
        )

    def to_json(self) -> dict:
        return {
            "grid": list(self.grid),
            "budget": self.budget,
            "validation_contexts": list(self.validation_contexts),
            "eval_contexts": list(self.eval_contexts),
            "metric": self.metric,
            "scores": {k: list(v) for k, v in self.scores.items()},
            "chosen": dict(self.chosen),
        }


# --- the blind rating kit (analysis/rate.py) ---------------------------------------------------


@dataclass(frozen=True)
class RatingItem:
    item: str  # the opaque id shown on the page
    sae: str
    kind: str  # group | baseline
    layer: int
    latent: int

    @classmethod
    def from_json(cls, obj: Mapping) -> RatingItem:
        return cls(str(obj["item"]), str(obj["sae"]), str(obj["kind"]), int(obj["layer"]), int(obj["latent"]))

    def to_json(self) -> dict:
        return {"item": self.item, "sae": self.sae, "kind": self.kind, "layer": self.layer, "latent": self.latent}


@dataclass(frozen=True)
class RatingKey:
    """report/rating-key-<kit>.json: which SAE, layer and latent each opaque item id on the rating
    page with this kit id is (the blind's key; the page names none of them, its CSV carries the kit).
    Runs rated before each page had its own key hold one report/rating-key.json of the same form."""

    kit: str
    run: str
    baseline: str | None
    seed: int
    items: tuple[RatingItem, ...]

    @classmethod
    def from_json(cls, obj: Any) -> RatingKey:
        obj = _check_version(obj, "rating-key.json")
        items = tuple(RatingItem.from_json(i) for i in obj["items"])
        return cls(str(obj["kit"]), str(obj["run"]), obj.get("baseline"), int(obj["seed"]), items)

    def to_json(self) -> dict:
        return {
            "kit": self.kit,
            "run": self.run,
            "baseline": self.baseline,
            "seed": self.seed,
            "items": [i.to_json() for i in self.items],
        }


@dataclass(frozen=True)
class Score:
    """One SAE and layer's share of latents rated interpretable, with its Wilson interval."""

    sae: str
    kind: str
    layer: int
    interpretable: int
    not_interpretable: int
    unsure: int
    proportion: float  # interpretable / (interpretable + not); nan when none rated
    low: float
    high: float

    @classmethod
    def from_json(cls, obj: Mapping) -> Score:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class RatingScores:
    """report/ratings.json: the scored ratings of one kit (the next report shows them)."""

    kit: str
    scores: tuple[Score, ...]

    @classmethod
    def from_json(cls, obj: Any) -> RatingScores:
        obj = _check_version(obj, "ratings.json")
        return cls(str(obj["kit"]), tuple(Score.from_json(s) for s in obj["scores"]))

    def to_json(self) -> dict:
        return {"kit": self.kit, "scores": [s.to_json() for s in self.scores]}


# --- reading and writing --------------------------------------------------------------------------

R = TypeVar("R")


def load_record(cls: type[R], path: Path, fix: str = "re-run `ghsae harvest` with the same config to rewrite it") -> R:
    """Read one record; an unreadable or malformed file is a DamagedFileError naming it and the fix."""
    obj = read_json(path, fix=fix)
    try:
        return cls.from_json(obj)  # type: ignore[attr-defined]
    except DamagedFileError as e:
        raise DamagedFileError(f"{path}: {e}; {fix}") from None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DamagedFileError(
            f"{path} is damaged: not a {cls.__name__} record ({type(e).__name__}: {e}); {fix}"
        ) from None


def save_record(path: Path, record: Any) -> None:
    write_json_atomic(path, record.to_json())
