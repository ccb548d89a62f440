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

Each record is a frozen dataclass deriving its JSON from its fields (ghsae/jsonrecord.py): one key
per field, in field order, each value checked against the field's type; code elsewhere uses fields,
never `data["key"]`. What a field's JSON does beyond that is in its `stored(...)`: another key, what
an absent key reads as, a value left out. `to_json` gives back exactly the dict ghsae has always
written, so a record read and written again is the same bytes (tests/unit/core/test_records_roundtrip.py
pins every record's, tests/integration/test_stored_run.py a whole run's).

A field added later gets a default (older files lack its key: it reads as the default) and, where
files written before it must stay the same bytes, `stored(omit_if=<the default>)`.

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
from typing import Any, Self, TypeVar

from ghsae.atomic import read_json, write_json_atomic
from ghsae.errors import DamagedFileError
from ghsae.jsonrecord import RECORD_VERSION, JsonRecord, RecordError, stored
from ghsae.layout import SAE_FORMAT

STATS_FROM_STORED = "stored-rows"  # a plan's per-layer sums are of the rows as stored (a derived run reproduces them)
STATS_FROM_MODEL = "model-output"  # ... of the model's output before the cast (older plans)
HOOKPOINT_DEFAULT = "resid_post"  # a plan or SAE record without a hookpoint stored the block outputs
# A field added after the records it is missing from: left out while None, so those files keep their bytes.
OMITTED_IF_NONE = stored(omit_if=None)


# --- the run folder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMarker(JsonRecord):
    """ghsae-run.json. Its version is the run format's (layout.RUN_FORMAT_VERSION), which
    harvest/rundir.py compares: no record version is checked here. A marker missing a key, or not
    a JSON object at all, reads as format "", which rundir names "not a ghsae run marker"."""

    format: str = field(metadata=stored(absent=""))
    version: int = field(metadata=stored(absent=0))
    created: float = field(metadata=stored(absent=0.0))

    @classmethod
    def from_json(cls, obj: Any) -> Self:
        return super().from_json(obj if isinstance(obj, dict) else {})


@dataclass(frozen=True)
class RunConfig(JsonRecord):
    """config.json: the harvest's config. `identity` decides what the store holds (its hash names
    the run), `resolved` is every setting as harvest saw it, runtime ones included. A missing key
    reads empty: the identity check then names the difference instead of refusing the file."""

    stored_in = "config.json"
    identity: Mapping[str, Any] = field(metadata=stored(absent={}))
    resolved: Mapping[str, Any] = field(metadata=stored(absent={}))
    hash: str = field(metadata=stored(absent=""))


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity(JsonRecord):
    source: str  # what the user named: a folder, a .gguf file, a hub id, builtin:...
    fingerprint: str  # model.lm.model_fingerprint: config plus both ends of each weight file
    # the transformers class loaded; "class" is a Python keyword, hence the field's other name
    class_name: str = field(metadata=stored("class", absent=""))
    # a Hub id's commit in the local cache (absent for local models)
    revision: str | None = field(default=None, metadata=OMITTED_IF_NONE)


@dataclass(frozen=True)
class TokenizerIdentity(JsonRecord):
    fingerprint: str
    bos: int | None = field(metadata=stored(absent=None))  # prepended to every context (None: no BOS)
    eos: int | None = field(metadata=stored(absent=None))  # between documents
    special_ids: tuple[int, ...] = field(metadata=stored(absent=()))  # never stored, never evaluated


@dataclass(frozen=True)
class DatasetIdentity(JsonRecord):
    spec: str  # data.dataset as given
    fingerprint: str = field(metadata=stored(absent=""))  # sha256 of the packed token array
    # (path, bytes) of each input file
    files: tuple[tuple[str, int], ...] | None = field(default=None, metadata=OMITTED_IF_NONE)
    # the built-in corpus: the Python version whose docs it is
    python: str | None = field(default=None, metadata=OMITTED_IF_NONE)
    revision: str | None = field(default=None, metadata=OMITTED_IF_NONE)  # a Hub dataset id's commit in the local cache


@dataclass(frozen=True)
class GroupingRecord(JsonRecord):
    """How the groups were chosen (JSON key "amad" of plan.json).

    With last_layer = own, the partition covers layers 0..L-2 of the L harvested layers and the last
    has a group of its own: the curves run over G = 1..L-1 and chosen_groups / chosen_amad count the
    groups of layers 0..L-2 only (the plan has chosen_groups + 1 groups)."""

    distance: str  # raw | layer-centred (or "centred", the older name, kept as written)
    # dp | agglomerative | reference (absent: plans made before grouping.method, which used the DP)
    method: str = field(metadata=stored(absent="dp"))
    threshold: float  # AMAD threshold of groups = auto
    objective: str = field(metadata=stored(absent="layer-mean"))  # what dp minimised (the other methods: their linkage)
    # AMAD of the method's partition at G = 1..(layers partitioned)
    curve: tuple[float, ...] = field(metadata=stored(absent=()))
    objective_curve: tuple[float, ...] = field(metadata=stored(absent=()))  # the objective at the same G
    chosen_groups: int  # G: groups of the layers partitioned
    chosen_amad: float  # AMAD over those groups
    # own | grouped (absent: plans made before, which partitioned every layer; left out when grouped, as there)
    last_layer: str = field(default="grouped", metadata=stored(omit_if="grouped"))

    @property
    def own_last_layer(self) -> bool:
        return self.last_layer == "own"

    def describe(self, layers: tuple[int, ...] | list[int]) -> str:
        """ "G = 6 groups of layers 0..28, plus layer 29 on its own" (or "G = 6 groups of layers 0..29")."""
        partitioned = layers[:-1] if self.own_last_layer else layers
        text = f"G = {self.chosen_groups} group{'s' if self.chosen_groups != 1 else ''} of layers {partitioned[0]}..{partitioned[-1]}"
        return f"{text}, plus layer {layers[-1]} on its own" if self.own_last_layer else text


@dataclass(frozen=True)
class Plan(JsonRecord):
    """plan/plan.json: everything fixed once per run before any shard is written."""

    stored_in = "plan.json"
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
    n_contexts_eval: int = field(metadata=stored(absent=0))  # rows after them, held out for the report
    contexts_per_shard: int
    n_shards: int
    shard_rows: int  # row capacity of a shard in every group's arrays
    grouping: GroupingRecord = field(metadata=stored("amad"))  # stored under "amad", as every plan.json has it
    probe_tokens: int = field(metadata=stored(absent=0))
    # tokenise + probe + partition: part of the report's harvest cost A
    seconds: float | None = field(default=None, metadata=OMITTED_IF_NONE)
    # what the shards' per-layer sums are taken of (absent, and left out: an older plan, model-output)
    stats_from: str = field(default=STATS_FROM_MODEL, metadata=stored(omit_if=STATS_FROM_MODEL))
    # which activation of each layer is stored (harvest.hookpoint; absent, and left out: resid_post,
    # as in every plan made before hookpoints)
    hookpoint: str = field(default=HOOKPOINT_DEFAULT, metadata=stored(omit_if=HOOKPOINT_DEFAULT))

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
class GroupRows(JsonRecord):
    """One group's rows in one shard, as its record describes them."""

    rows: int
    layer_counts: Mapping[int, int]  # rows drawn from each layer of the group
    checksums: Mapping[str, str]  # array name -> blake2b-128 of its valid rows
    # array name -> shard-file bytes (absent in old records; left out when empty, as there)
    files: Mapping[str, int] = field(default_factory=dict, metadata=stored(omit_if={}))


@dataclass(frozen=True)
class LayerSums(JsonRecord):
    """Sums over one shard's rows of one layer (the normalisation statistics add these up)."""

    count: int
    sum_norm: float
    sum_sq_norm: float


@dataclass(frozen=True)
class ShardRecord(JsonRecord):
    """manifest/shard-NNNNN.json: the only mark of a done shard, written last."""

    stored_in = "the shard record"
    shard: int
    config_hash: str
    contexts: tuple[int, int]  # [start, stop) of tokens.npy rows the shard covers
    stored_tokens: int  # rows of every group (one per non-special token)
    groups: Mapping[str, GroupRows]
    layer_stats: Mapping[int, LayerSums]
    seconds: float | None = field(default=None, metadata=OMITTED_IF_NONE)  # the shard's forward pass (part of A)
    written_at: float | None = field(default=None, metadata=OMITTED_IF_NONE)


@dataclass(frozen=True)
class NormSummary(JsonRecord):
    """A layer's token-norm distribution as stats.json records it (cache/norms.py): quantiles read
    off log-spaced bins 4.4 % wide, the largest norm exactly, and the outliers at the run's factor."""

    median_norm: float
    q99_norm: float
    q999_norm: float
    max_norm: float
    outliers: float  # tokens above outlier_factor x median_norm (a whole number, from the bins)


@dataclass(frozen=True)
class LayerStats(JsonRecord):
    count: int
    mean_norm: float
    mean_sq_norm: float
    scale: float  # sqrt(d) / E||x||, the per-layer normalisation factor
    # absent in runs harvested before norms were counted
    norms: NormSummary | None = field(default=None, metadata=OMITTED_IF_NONE)


@dataclass(frozen=True)
class RunStats(JsonRecord):
    """manifest/stats.json: per-layer statistics over every shard (written once all are done)."""

    stored_in = "stats.json"
    config_hash: str
    d_model: int
    target_norm: float
    layers: Mapping[int, LayerStats]
    # the factor the layers' outlier counts use
    outlier_factor: float | None = field(default=None, metadata=OMITTED_IF_NONE)


# --- SAEs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreState(JsonRecord):
    """The store an SAE trained on: the harvest config, the shards, a digest of their checksums."""

    config_hash: str
    shards: tuple[int, ...]
    n_shards: int
    rows_digest: str


@dataclass(frozen=True)
class Provenance(JsonRecord):
    """What an SAE was trained with: the fit settings that decide its weights, and the store."""

    fit: Mapping[str, Any]
    store: StoreState


@dataclass(frozen=True)
class WeightsDigest(JsonRecord):
    """The SAE's weights file as fit wrote it: its size and SHA-256, so a damaged file is refused."""

    size: int = field(metadata=stored("bytes"))  # bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> WeightsDigest:
        return cls(len(data), hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class SAERecord(JsonRecord):
    """saes/<group>/cfg.json: the SAE's config (SAEConfig's fields), and how it was trained."""

    stored_in = "the SAE's cfg.json"
    sae: Mapping[str, Any]  # ghsae.sae.SAEConfig as JSON (its owner builds it back)
    # "format" and "version" mark the folder as ghsae's to tools that know sparsify's file names
    # (cfg.json + sae.safetensors); None (absent, and left out): written before the mark existed (loads the same)
    format: str | None = field(default=SAE_FORMAT, metadata=stored(absent=None, omit_if=None))
    version: int | None = field(default=RECORD_VERSION, metadata=stored(absent=None, omit_if=None))
    # the whole [fit] section it was trained with (left out when empty, as ghsae always has)
    fit: Mapping[str, Any] = field(default_factory=dict, metadata=stored(omit_if={}))
    # None: written by a ghsae before provenance existed
    provenance: Provenance | None = field(default=None, metadata=OMITTED_IF_NONE)
    tokens: int = 0  # training tokens seen
    steps: int = 0
    # training wall time, summed over resumed sessions (the report's T)
    seconds: float | None = field(default=None, metadata=OMITTED_IF_NONE)
    # None: written before checksums existed (loads unchecked)
    weights: WeightsDigest | None = field(default=None, metadata=OMITTED_IF_NONE)

    @classmethod
    def check_json(cls, obj: dict) -> None:
        """Another tool's cfg.json is refused naming the tool, not as a damaged ghsae record."""
        fmt = obj.get("format")
        if fmt is not None and fmt != SAE_FORMAT:
            raise DamagedFileError(f"its format is {fmt!r}, not a ghsae SAE folder ({SAE_FORMAT!r})")
        if "sae" not in obj and "d_in" in obj:  # sparsify's cfg.json, beside a sae.safetensors
            raise DamagedFileError(
                "it is a sparsify SAE folder (d_in, no sae field), not a ghsae one: "
                "open it with sparsify's SparseCoder.load_from_disk"
            )

    @property
    def layers(self) -> list[int]:
        return list(self.sae["layers"])

    @property
    def architecture(self) -> str:
        return str(self.sae["architecture"])


@dataclass(frozen=True)
class FitSettings(JsonRecord):
    """saes/fit.json: the [fit] section the run's SAEs are trained with (fit reads it back, report
    takes its seed). Written by the first `ghsae fit`; another fit with other settings is refused
    unless --overwrite."""

    stored_in = "saes/fit.json"
    fit: Mapping[str, Any]


@dataclass(frozen=True)
class ReportSettings(JsonRecord):
    """report/settings.json: the [report] section, the fit seed and the model settings the last
    report was made with."""

    stored_in = "report/settings.json"
    report: Mapping[str, Any]
    seed: int
    model: Mapping[str, Any]
    baseline: str | None = None


@dataclass(frozen=True)
class DerivedFrom(JsonRecord):
    """derived.json: the all-layers run a grouped run's rows were gathered from (harvest/derive.py).
    No model ran for the derived run: the source's harvest is its model pass, and its own shard
    records' seconds are the derivation's."""

    stored_in = "derived.json"
    source: str  # relative to the derived run where it can be (the pair moves together)
    source_config_hash: str

    def source_path(self, run_root: Path) -> Path:
        return (run_root / self.source).resolve()


@dataclass(frozen=True)
class SweepRecord(JsonRecord):
    """SWEEP/ghsae-sweep.json: this folder is a sweep (ghsae/sweep.py) of these groupings."""

    stored_in = "ghsae-sweep.json"
    format: str
    version: int
    groupings: tuple[str, ...]  # as last given to --groups: numbers, auto, per-layer
    config_hash: str  # the harvest identity of the sweep's config
    created: float
    fit_hash: str = ""  # the fit settings every grouping trains with ("": not recorded)
    budgets: tuple[int, ...] = ()  # every tokens-per-SAE budget trained so far (--budgets), ascending
    harvest_tokens: int = 0  # tokens the one harvest holds (with budgets: the largest at creation; 0: not recorded)


@dataclass(frozen=True)
class LrChoiceRecord(JsonRecord):
    """SWEEP/lr-choice.json: each arm's learning rate, picked on held-out contexts the evaluation never sees."""

    stored_in = "lr-choice.json"
    grid: tuple[float, ...]
    budget: int  # tokens per SAE the grid was trained at (the smallest budget)
    validation_contexts: tuple[int, int]  # [start, stop) rows of tokens.npy the choice is measured on
    eval_contexts: tuple[int, int]  # [start, stop) rows the sweep evaluates on (disjoint from the above)
    metric: str  # what was minimised, averaged over each arm's SAEs and layers
    scores: dict[str, tuple[float, ...]]  # arm -> its validation metric at each learning rate of the grid
    chosen: dict[str, float]  # arm -> the learning rate it trains with at every budget


# --- the blind rating kit (analysis/rate.py) ---------------------------------------------------


@dataclass(frozen=True)
class RatingItem(JsonRecord):
    item: str  # the opaque id shown on the page
    sae: str
    kind: str  # group | baseline
    layer: int
    latent: int


@dataclass(frozen=True)
class RatingKey(JsonRecord):
    """report/rating-key-<kit>.json: which SAE, layer and latent each opaque item id on the rating
    page with this kit id is (the blind's key; the page names none of them, its CSV carries the kit).
    Runs rated before each page had its own key hold one report/rating-key.json of the same form."""

    stored_in = "rating-key.json"
    kit: str
    run: str
    baseline: str | None = field(metadata=stored(absent=None))
    seed: int
    items: tuple[RatingItem, ...]


@dataclass(frozen=True)
class Score(JsonRecord):
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


@dataclass(frozen=True)
class RatingScores(JsonRecord):
    """report/ratings.json: the scored ratings of one kit (the next report shows them)."""

    stored_in = "ratings.json"
    kit: str
    scores: tuple[Score, ...]


# --- reading and writing --------------------------------------------------------------------------

R = TypeVar("R", bound=JsonRecord)


def load_record(cls: type[R], path: Path, fix: str = "re-run `ghsae harvest` with the same config to rewrite it") -> R:
    """Read one record; an unreadable or malformed file is a DamagedFileError naming it and the fix."""
    obj = read_json(path, fix=fix)
    try:
        return cls.from_json(obj)
    except RecordError as e:  # "not a Plan record (n_shards is missing; expected an integer)"
        raise DamagedFileError(f"{path} is damaged: {e}; {fix}") from None
    except DamagedFileError as e:  # a newer version, not an object, another tool's file
        raise DamagedFileError(f"{path}: {e}; {fix}") from None


def save_record(path: Path, record: JsonRecord) -> None:
    write_json_atomic(path, record.to_json())
