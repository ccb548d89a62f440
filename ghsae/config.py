"""Typed configuration read from pipeline.toml; CLI flags override it.

One dataclass per section. Validation lives in __post_init__ and does no I/O, so a
config can be built and checked anywhere (a dask worker, a test) without touching
disk or network. Unknown keys and wrong types are errors that name the key, the file
and the expected type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ghsae.errors import ConfigError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "pipeline.toml"

STORAGE_DTYPES = ("float16", "bfloat16")
COMPRESSIONS = ("none", "zstd", "blosc")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DISTANCES = ("raw", "layer-centred", "centred")  # harvest.similarity's names plus its alias "centred" (tested)
GROUPING_METHODS = ("agglomerative", "dp", "reference")  # kept in step with harvest.partition.METHODS (tested)
LAST_LAYER = ("own", "grouped")  # kept in step with harvest.partition.LAST_LAYER (tested)
OBJECTIVES = ("layer-mean", "amad", "max")  # kept in step with harvest.partition.OBJECTIVES (tested)
CE_LAYERS = ("auto", "all", "spot")  # report.ce_layers' named choices (else a list of layers)
TASKS = ("ioi", "greater-than", "sva")  # kept in step with analysis.tasks.GENERATORS (tested)
HOOKPOINTS = ("resid_post", "resid_mid", "mlp_out", "attn_out")  # kept in step with ghsae.lm.HOOKPOINTS (tested)


def runtime(default: Any) -> Any:
    """A field that changes how a run executes but not what it writes.

    Runtime fields are left out of the run's identity, so resuming on another device
    or with another batch size is allowed.
    """
    return field(default=default, metadata={"runtime": True})


def added_later(default: Any, before: Any) -> Any:
    """A field added after runs were made; `before` is what those runs did without it.

    While the field holds `before` it is left out of the identity, so a run made before the field
    existed keeps its identity (and hash) under a config that asks for the same thing.
    """
    return field(default=default, metadata={"before": before})


@dataclass
class ModelConfig:
    path: str = "builtin:smollm2-135m"
    """A local model folder, a .gguf file, a Hub id (org/name[@revision]) the local Hugging Face cache holds
    (nothing is downloaded; the commit it resolves to is recorded in plan.json), or builtin:smollm2-135m."""
    dtype: str = runtime("auto")
    """Compute dtype of the forward pass: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.
    On a 2-core AMD EPYC with AVX-512 BF16, bfloat16 made the default `ghsae run` 1.3x faster at the same gap
    within a seed's noise (docs/results.md); auto keeps float32 on every CPU so a run's numbers do not depend on it."""
    device: str = runtime("auto")
    """auto (CUDA when present), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError(
                "model.path is empty; expected a model folder, .gguf file, hub id or builtin:smollm2-135m"
            )
        _check_choice("model.dtype", self.dtype, MODEL_DTYPES)
        _check_device("model.device", self.device)


@dataclass
class DataConfig:
    dataset: str = "builtin:python-docs"
    """A .txt/.jsonl/.parquet/.arrow file, a folder of them, a glob, a folder written by datasets' save_to_disk,
    a Hub dataset id (org/name[/folder][@revision]) the local Hugging Face cache holds (streamed, nothing
    downloaded; its train split), or builtin:python-docs (CPython's own documentation)."""
    text_field: str = "text"
    """The text field of .jsonl records and the text column of .parquet/.arrow files."""
    tokens_field: str = "input_ids"
    """The column of already tokenized .parquet/.arrow files, used when the text column is absent."""
    context_length: int = 256
    """Tokens per packed context, BOS included."""
    prepend_bos: bool = True
    """Start every context with the tokenizer's BOS token (when it has one); BOS positions are never stored."""

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ConfigError(f"data.context_length is {self.context_length}; expected at least 2")


@dataclass
class HarvestConfig:
    tokens: int = 98_304
    """Token positions to harvest (rounded up to whole contexts); each group stores one row per non-special token."""
    eval_tokens: int = 32_768
    """Token positions held out after the harvested ones, for the report's evals."""
    probe_tokens: int = 16_384
    """Token positions (from the start of the harvest, at most harvest.tokens) used to measure layer similarity."""
    shard_tokens: int = 65_536
    """Token positions per shard, the unit of work and resumption; a multiple of data.context_length."""
    seed: int = 0
    """Seeds the layer draws and in-shard shuffles; shard s depends only on (config, seed, s)."""
    batch_size: int = runtime(16)
    """Contexts per forward pass."""
    hookpoint: str = added_later("resid_post", before="resid_post")
    """Which activation of each layer is harvested: resid_post (the block's output, the residual
    stream), resid_mid (the residual after attention, before the MLP), mlp_out or attn_out (the MLP's or
    the attention's output, before it is added to the residual). All but resid_post need a model family
    whose modules ghsae knows (Llama, GPT-NeoX, GPT-2)."""

    def __post_init__(self) -> None:
        _check_choice("harvest.hookpoint", self.hookpoint, HOOKPOINTS)
        for name in ("tokens", "probe_tokens", "shard_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"harvest.{name} is {getattr(self, name)}; expected a positive integer")
        if self.eval_tokens < 0:
            raise ConfigError(f"harvest.eval_tokens is {self.eval_tokens}; expected 0 or more")
        _check_seed("harvest.seed (--seed)", self.seed)


GroupsSpec = str | int | list[list[int]]


@dataclass
class GroupingConfig:
    groups: GroupsSpec = "auto"
    """auto (smallest G with AMAD below amad_threshold), per-layer (G = L, the baseline), a number G, or [[first, last], ...] ranges."""
    amad_threshold: float = 0.2
    """AMAD threshold for groups = auto; the paper's range is 0.14 to 0.20."""
    method: str = added_later("reference", before="dp")
    """How each G's partition is found: dp (exact dynamic program for `objective`), agglomerative
    (complete linkage of the distance matrix, adjacent clusters only) or reference (the reference
    code's: sklearn's complete linkage on the matrix's rows; a partition that is not contiguous is refused)."""
    objective: str = "layer-mean"
    """What the dp method minimises for each G: layer-mean (mean over layers of their group's diameter), amad (degenerate: favours singletons) or max."""
    distance: str = "layer-centred"
    """Which angular distance the partition uses: layer-centred (the reference's: each layer minus its
    mean before the cosines; the reference subtracts a running mean, alpha 0.05 per batch, ghsae the
    exact mean over the probe tokens: the same quantity without the running mean's lag) or raw (plain
    cosines of the residuals). "centred" is read as layer-centred (runs made before the rename); it is
    kept as written, so such a run's identity does not change."""
    last_layer: str = added_later("own", before="grouped")
    """own (the reference's): the last harvested layer gets an SAE of its own and G, the AMAD curve and
    the threshold rule count layers 0..L-2 only (so a run has G + 1 SAEs); grouped: every layer is
    partitioned. per-layer and explicit ranges are not changed by it."""
    layers: str | list[int] = "all"
    """Layers to harvest: all, or [first, last] inclusive."""

    def __post_init__(self) -> None:
        _check_finite(self, "grouping")
        _check_choice("grouping.distance", self.distance, DISTANCES)
        _check_choice("grouping.method", self.method, GROUPING_METHODS)
        _check_choice("grouping.objective", self.objective, OBJECTIVES)
        _check_choice("grouping.last_layer", self.last_layer, LAST_LAYER)
        if not 0.0 < self.amad_threshold < 1.0:
            raise ConfigError(f"grouping.amad_threshold is {self.amad_threshold}; expected a value in (0, 1)")
        if isinstance(self.groups, str) and self.groups not in ("auto", "per-layer"):
            raise ConfigError(
                f"grouping.groups is {self.groups!r}; expected auto, per-layer, a number of groups, or [[first, last], ...]"
            )
        if isinstance(self.groups, int) and self.groups < 1:
            raise ConfigError(f"grouping.groups is {self.groups}; expected at least 1 group")
        if isinstance(self.groups, list):
            for r in self.groups:
                if len(r) != 2 or r[0] > r[1]:
                    raise ConfigError(f"grouping.groups has range {r}; expected [first, last] with first <= last")
        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"grouping.layers is {self.layers!r}; expected all or [first, last]")
        if isinstance(self.layers, list) and (
            len(self.layers) != 2 or self.layers[0] > self.layers[1] or self.layers[0] < 0
        ):
            raise ConfigError(f"grouping.layers is {self.layers}; expected [first, last] with 0 <= first <= last")


@dataclass
class StorageConfig:
    dtype: str = "float16"
    """float16, or bfloat16 (kept as uint16 with a logical_dtype attribute: Zarr has no bfloat16)."""
    compression: str = "none"
    """none (raw chunks, memory-mappable), zstd or blosc."""
    chunk_rows: int = 4096
    """Rows per inner chunk; chunks are full width and divide harvest.shard_tokens."""

    def __post_init__(self) -> None:
        _check_choice("storage.dtype", self.dtype, STORAGE_DTYPES)
        _check_choice("storage.compression", self.compression, COMPRESSIONS)
        if self.chunk_rows < 1:
            raise ConfigError(f"storage.chunk_rows is {self.chunk_rows}; expected a positive integer")


ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")  # the built-in ones of ghsae.sae.REGISTRY (tested)
LR_DECAYS = ("none", "linear", "cosine")
AUXK_NORMALISATIONS = ("total-variance", "error-variance")  # kept in step with ghsae.sae (tested)
TRANSFERS = ("none", "previous-group")
OUTLIER_HANDLING = ("keep", "drop", "clip")  # kept in step with cache.loader.OUTLIER_HANDLING (tested)
TRACKERS = ("tensorboard", "wandb")  # train/tracking.py


@dataclass
class FitConfig:
    """[fit]: the training settings every architecture shares, and the architecture's own options.

    An architecture's options are its [fit.<architecture>] table (its Options dataclass in
    ghsae/sae/<file>.py). The built-in architectures' options (k, aux_coef, auxk_normalisation,
    sparsity_coef) are also read, and always stored, as flat [fit] keys, as their runs always were.
    """

    architecture: str = "topk"
    """SAE architecture: topk (the Group-SAE reference), batchtopk, jumprelu, relu, or any registered one."""
    expansion: int = 16
    """Latents per residual dimension: m = expansion * d."""
    k: int = 128
    """Active latents per token (topk, batchtopk; [fit.topk] k)."""
    tokens: int = 0
    """Training tokens per SAE (T); 0 means one pass over the group's stored rows."""
    batch_size: int = 512
    """Rows per optimiser step. The reference trains with 4096 over hundreds of millions of tokens;
    512 gives the embedded default's short CPU run (about 100K rows per group) enough steps."""
    lr: float = 0.003
    """Adam learning rate; 0 means 2e-4 / sqrt(m / 2^14), the reference's scaling for long runs.
    The default suits the embedded default's short fit (docs/results.md: the learning rate of the
    default fit)."""
    warmup_tokens: int = 0
    """Linear learning-rate warm-up over this many tokens."""
    decay: str = "linear"
    """Learning-rate decay over the last decay_fraction of training: none, linear or cosine."""
    decay_fraction: float = 0.2
    """Share of training, at the end, over which the learning rate decays to zero."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    aux_coef: float = 0.03125
    """AuxK loss weight (topk, batchtopk; [fit.topk] aux_coef)."""
    auxk_normalisation: str = "total-variance"
    """How the AuxK loss is scaled (topk, batchtopk). total-variance (the Group-SAE reference and
    sparsify): the dead latents' squared error on the residual over the total variance of x, times
    min(n_dead / k_aux, 1) with k_aux = d/2. error-variance (OpenAI's implementation): over the
    variance of the residual error itself, no factor. Recorded in each SAE's cfg.json."""
    dead_tokens: int = 0
    """A latent is dead (and AuxK works on it) after this many training tokens without firing; the
    training log's dead % is the share of such latents. 0 = auto: min(10M, a tenth of the tokens the
    SAE trains on), so short runs find and revive dead latents too (the reference's 10M assumes
    ~1B-token runs). The report's dead % is another window: latents never active on the held-out
    tokens (harvest.eval_tokens)."""
    sparsity_coef: float = 0.001
    """L0 (jumprelu) or L1 (relu) weight ([fit.jumprelu] / [fit.relu] sparsity_coef)."""
    centre: bool = False
    """Also subtract each layer's mean before scaling (the scale alone is the paper's normalisation)."""
    checkpoint_tokens: int = 1_048_576
    """Write a checkpoint every this many training tokens (and at the end)."""
    seed: int = 0
    """Seeds the SAE initialisation and the loader's order."""
    init_from: str = ""
    """Start from this trained SAE folder (transfer: Ghilardi et al., BlackboxNLP 2024) instead of random."""
    outliers: str = added_later("clip", before="keep")
    """What the SAE trains on at a layer's outlier tokens (norm above outlier_factor x the layer's median:
    massive activations): keep them as they are, drop them from the batch, or clip them to that norm.
    The default is the one no worse than keep on any measured figure (docs/results.md, fit.outliers)."""
    outlier_factor: float = added_later(10.0, before=10.0)
    """The multiple of a layer's median token norm (the harvest's norm histograms) above which fit.outliers applies."""
    transfer: str = added_later("none", before="none")
    """none, or previous-group: each group's SAE starts from the previous group's trained SAE of the
    same run (its weights; its own layers' normalisation), the groups trained in order; the first
    group's starts from scratch (transfer between neighbouring layers, Ghilardi et al., BlackboxNLP 2024)."""
    device: str = runtime("auto")
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    log: list[str] = field(default_factory=list, metadata={"runtime": True})
    """Experiment trackers that also get the training metrics: any of tensorboard (RUN/tensorboard/)
    and wandb (RUN/wandb/, offline unless WANDB_MODE is set); empty: metrics.parquet only. Optional
    packages: pip install 'ghsae[tracking]'. A runtime setting: it changes no SAE."""
    options: dict = field(default_factory=dict, metadata={"tables": True})
    """The [fit.<architecture>] tables of architectures whose options are not flat [fit] keys, by
    name; stored as those tables (nothing, for the built-in architectures)."""

    def __post_init__(self) -> None:
        _check_finite(self, "fit")
        unknown = [name for name in self.log if name not in TRACKERS]
        if unknown or len(set(self.log)) < len(self.log):
            raise ConfigError(f"fit.log is {self.log}; expected distinct names among {', '.join(TRACKERS)}")
        _check_device("fit.device", self.device)
        if self.architecture not in ARCHITECTURES or self.options:
            _check_architecture(self.architecture, self.options)
        _check_choice("fit.decay", self.decay, LR_DECAYS)
        _check_choice("fit.auxk_normalisation", self.auxk_normalisation, AUXK_NORMALISATIONS)
        _check_choice("fit.transfer", self.transfer, TRANSFERS)
        _check_choice("fit.outliers", self.outliers, OUTLIER_HANDLING)
        if not self.outlier_factor > 1.0:  # also refuses nan
            raise ConfigError(f"fit.outlier_factor is {self.outlier_factor}; expected a number above 1 (10 is usual)")
        if self.transfer != "none" and self.init_from:
            raise ConfigError("fit.transfer and fit.init_from both say where an SAE starts; set one of them")
        if self.dead_tokens < 0:
            raise ConfigError(f"fit.dead_tokens is {self.dead_tokens}; expected 0 (auto) or a positive token count")
        for name in ("expansion", "k", "batch_size", "checkpoint_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fit.{name} is {getattr(self, name)}; expected a positive integer")
        for name in ("tokens", "lr", "warmup_tokens", "grad_clip", "aux_coef", "sparsity_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"fit.{name} is {getattr(self, name)}; expected 0 or more")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"fit.decay_fraction is {self.decay_fraction}; expected a value in [0, 1]")
        _check_seed("fit.seed", self.seed)


def _check_architecture(architecture: str, tables: dict[str, Any]) -> None:
    """A registered architecture, and tables each of a registered architecture that keeps its options
    in a table. Only other architectures than the built-in ones import the registry (and torch)."""
    from ghsae.sae import REGISTRY

    if architecture not in REGISTRY:
        raise ConfigError(f"fit.architecture is {architecture!r}; expected one of {', '.join(REGISTRY)}")
    for name, table in tables.items():
        cls = REGISTRY.get(name)
        if cls is None or cls.flat_options:
            raise ConfigError(f"[fit.{name}] is no architecture's table; expected one of {', '.join(REGISTRY)}")
        _check_table(f"fit.{name}", cls.Options, table, "the config")


def _check_table(section: str, cls: type, table: Any, source: str) -> None:
    """A table that builds `cls` (an options dataclass): every key one of its fields, of its type."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{section}] must be a table, found {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"{source}: unknown key {section}.{key}; expected one of {expected}")
        if not _matches(value, hints[key]):
            raise ConfigError(
                f"{source}: {section}.{key} is {value!r} ({type(value).__name__}); expected {_type_name(hints[key])}"
            )
    try:
        cls(**table)  # the options' own checks
    except ValueError as e:
        raise ConfigError(f"{source}: [{section}] {e}") from None


def fit_tables(table: dict[str, Any], source: str) -> dict[str, Any]:
    """[fit] as read (flat keys and [fit.<architecture>] tables) -> FitConfig's keyword arguments: a
    built-in architecture's table goes to its flat keys (the form its runs are stored in), any other
    architecture's stays a table, in `options`."""
    flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if not tables:
        return flat
    from ghsae.sae import REGISTRY

    options: dict[str, Any] = {}
    for name, values in tables.items():
        cls = REGISTRY.get(name)
        if cls is None:
            raise ConfigError(f"{source}: unknown table [fit.{name}]; expected an architecture: {', '.join(REGISTRY)}")
        _check_table(f"fit.{name}", cls.Options, values, source)
        if not cls.flat_options:
            options[name] = dict(values)
            continue
        for key, value in values.items():
            if key in table and table[key] != value:
                raise ConfigError(
                    f"{source}: fit.{key} is {table[key]!r} and fit.{name}.{key} is {value!r}; set it in [fit.{name}] only"
                )
            flat[key] = value
    if options:
        flat["options"] = options
    return flat


def _stored(section: Any, names: list[str]) -> dict[str, Any]:
    """A section's fields `names` as stored: a field of tables (fit.options) is stored as its tables."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        if f.name not in names:
            continue
        value = getattr(section, f.name)
        if f.metadata.get("tables"):
            out.update(dataclasses.asdict(section)[f.name])
        else:
            out[f.name] = value
    return out


@dataclass
class ReportConfig:
    ce_tokens: int = 6_144
    """Held-out tokens (from the start of the eval split, whole contexts) over which spliced CE and KL
    are measured; every (SAE, layer) costs one pass of the blocks after its layer over them. On the
    default run's SAEs, 2,048 tokens (8 contexts) gave mean delta CE % 4.66 +- 0.75 (16 %); 6,144
    (24 contexts) projects to 9.3 % by 1/sqrt(contexts) (not yet re-measured)."""
    ce_layers: str | list[int] = "auto"
    """Where each SAE's reconstruction is spliced in for delta CE and KL (one pass of the later blocks
    per layer; FVU is measured at every layer regardless): all (every layer an SAE serves), spot (group
    SAEs at the layers that have a per-layer SAE, so the gap is paired; per-layer SAEs at theirs), a
    list of layers, or auto (spot when the report compares with the run's own spot checks, as
    `ghsae run` does by default; all otherwise)."""
    latents_shown: int = 8
    """Latents per SAE shown with the contexts where they fire hardest."""
    examples_per_latent: int = 5
    """Contexts shown per latent."""
    window: int = 16
    """Tokens of context shown before the firing token (and a quarter as many after)."""
    batch_contexts: int = runtime(4)
    """Contexts per forward pass of the evals (each keeps [batch, context, vocab] logits)."""
    device: str = runtime("auto")
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    tasks: list[str] = field(default_factory=list)
    """Circuit tasks measured per layer (ioi, greater-than, sva); empty: none. They cost many
    partial forward passes per layer and SAE (docs/benchmarks.md: measured), so the default run leaves them off."""
    task_prompts: int = 32
    """Prompts generated per circuit task (fixed seed)."""
    task_layers: list[int] = field(default_factory=list)
    """Layers whose circuits are measured; empty: every layer the SAEs serve."""
    task_kept: list[int] = field(default_factory=list)
    """Numbers of kept latents N of the curves; empty: 0, 1, 4, 16, ... and every latent."""
    task_min_accuracy: float = 0.7
    """A task is refused (clean metric shown, circuits skipped) when the clean model gets fewer of its
    prompts right than this; 0 measures every task."""
    task_batch: int = runtime(16)
    """Prompts per forward pass of the circuit evals (the edits of one layer are stacked on top)."""
    outlier_factor: float = 10.0
    """A held-out token whose norm at a layer exceeds this multiple of the layer's median norm (from the
    harvest's norm histograms) is an outlier there (a massive activation). Every FVU, delta CE and KL is
    reported twice: over all tokens, and `_typical`, outliers left out of FVU and kept clean when spliced."""

    def __post_init__(self) -> None:
        _check_finite(self, "report")
        _check_device("report.device", self.device)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:  # fails here, before any model is loaded
            raise ConfigError(f"report.tasks names {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
        if not 0 <= self.task_min_accuracy <= 1:
            raise ConfigError(f"report.task_min_accuracy is {self.task_min_accuracy}; expected a share in [0, 1]")
        if self.task_prompts < 1 or self.task_batch < 1 or any(n < 0 for n in self.task_kept):
            raise ConfigError(
                f"report.task_prompts ({self.task_prompts}) and report.task_batch ({self.task_batch}) must be "
                f"positive and report.task_kept ({self.task_kept}) non-negative"
            )
        for name in ("latents_shown", "examples_per_latent", "window", "batch_contexts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"report.{name} is {getattr(self, name)}; expected a positive integer")
        if not self.outlier_factor > 1.0:  # also refuses nan
            raise ConfigError(f"report.outlier_factor is {self.outlier_factor}; expected a number above 1 (10 is usual)")
        if isinstance(self.ce_layers, str) and self.ce_layers not in CE_LAYERS:
            raise ConfigError(
                f"report.ce_layers is {self.ce_layers!r}; expected {', '.join(CE_LAYERS)} or a list of layers, "
                'e.g. ce_layers = "all" in [report]'
            )
        if isinstance(self.ce_layers, list) and (not self.ce_layers or any(x < 0 for x in self.ce_layers)):
            raise ConfigError(f"report.ce_layers is {self.ce_layers}; expected a non-empty list of layers (0 or more)")
        if self.ce_tokens < 0:
            raise ConfigError(f"report.ce_tokens is {self.ce_tokens}; expected 0 (no CE evals) or more")


COMPARISONS = ("none", "spot-checks", "all")


@dataclass
class CompareConfig:
    per_layer: str = "spot-checks"
    """Per-layer SAEs `ghsae run` trains beside the group SAEs, to measure what grouping costs: none,
    spot-checks (at spot_layers, one per group by default) or all (every layer: the full baseline).
    Either needs every layer's activations: they are harvested once into RUN/per-layer, and the
    grouped store is derived from that harvest byte for byte, so the model runs once."""
    spot_layers: list[int] = field(default_factory=list)
    """Layers of the spot checks; empty: one layer of every multi-layer group, taken in turn at the
    group's first, middle and last layer along the groups (a singleton group's SAE is a per-layer
    SAE of its layer already)."""
    max_source_bytes: int = 0
    """Largest all-layers store the comparison may write, in bytes (0: only the free disk limits
    it). Over it, `ghsae run` harvests the grouped run alone and says so."""
    seeds: int = 1
    """Seeds trained per arm (`ghsae run`'s group and spot-check SAEs, each grouping of `ghsae sweep`).
    Seed s adds s to fit.seed (initialisation, loader order) and, for grouped runs, to harvest.seed
    (the layer draw); seed 0 is the run itself, seeds 1.. go in RUN/seed<s>/ and SWEEP/<name>-seed<s>/.
    Every gap then gets a standard error across seeds beside the one across eval contexts."""
    budgets: list[int] = field(default_factory=list)
    """Training tokens per SAE at which `ghsae sweep` trains every grouping (--budgets), each budget's
    SAEs in SWEEP/<grouping>-t<tokens>/, all from one harvest of the largest; empty: fit.tokens alone."""
    seeds_at_smallest: int = 0
    """Seeds per arm at the smallest of compare.budgets (--seeds-at-smallest), where an SAE is cheapest
    to train and its training noise largest; 0: compare.seeds, which every other budget trains."""
    lr_grid: list[float] = field(default_factory=list)
    """Learning rates `ghsae sweep` tries for each arm at its smallest budget (--lr-grid); each arm then
    trains at its own best on the validation split at every budget. Empty: fit.lr for every arm."""
    validation_tokens: int = 0
    """Held-out tokens (whole contexts, from the end of the held-out split) the learning-rate choice is
    measured on, kept out of the sweep's evaluation; 0: a quarter of harvest.eval_tokens."""

    def __post_init__(self) -> None:
        _check_choice("compare.per_layer", self.per_layer, COMPARISONS)
        if any(b < 1 for b in self.budgets):
            raise ConfigError(f"compare.budgets is {self.budgets}; expected positive token counts, e.g. 2048,8192")
        if any(lr <= 0 for lr in self.lr_grid) or self.validation_tokens < 0:
            raise ConfigError(
                f"compare.lr_grid ({self.lr_grid}) must hold positive learning rates, e.g. 1e-3,3e-3,1e-2, and "
                f"compare.validation_tokens ({self.validation_tokens}) must not be negative"
            )
        if self.seeds < 1:
            raise ConfigError(f"compare.seeds is {self.seeds}; expected 1 or more seeds per arm (--seeds N)")
        if self.seeds_at_smallest < 0:
            raise ConfigError(
                f"compare.seeds_at_smallest is {self.seeds_at_smallest}; expected 0 (compare.seeds at every budget) "
                "or the number of seeds at the smallest budget (--seeds-at-smallest N)"
            )
        if self.max_source_bytes < 0 or any(layer < 0 for layer in self.spot_layers):
            raise ConfigError(
                f"compare.max_source_bytes ({self.max_source_bytes}) and compare.spot_layers ({self.spot_layers}) "
                "must not be negative"
            )


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    grouping: GroupingConfig = field(default_factory=GroupingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        ctx = self.data.context_length
        if self.harvest.shard_tokens % ctx:
            raise ConfigError(
                f"harvest.shard_tokens ({self.harvest.shard_tokens}) is not a multiple of data.context_length ({ctx}); "
                f"try {max(1, self.harvest.shard_tokens // ctx) * ctx}"
            )
        if self.harvest.shard_tokens % self.storage.chunk_rows:
            raise ConfigError(
                f"storage.chunk_rows ({self.storage.chunk_rows}) does not divide harvest.shard_tokens "
                f"({self.harvest.shard_tokens}); each shard must hold whole chunks"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fit"] = {k: v for k, v in out["fit"].items() if k != "options"} | dict(out["fit"]["options"])
        return out

    def identity(
        self, sections: tuple[str, ...] = ("model", "data", "harvest", "grouping", "storage")
    ) -> dict[str, Any]:
        """Every field of `sections` that decides what is written (runtime fields left out).

        The default is the harvest's sections: the activation cache does not depend on [fit], so
        changing a training setting never invalidates a harvest.
        """
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            if section.name not in sections:
                continue
            obj = getattr(self, section.name)
            names = [
                f.name
                for f in dataclasses.fields(obj)
                if not f.metadata.get("runtime")
                and not ("before" in f.metadata and getattr(obj, f.name) == f.metadata["before"])
            ]
            out[section.name] = _stored(obj, names)
        return out

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_seed(key: str, value: int) -> None:
    # numpy's default_rng and torch.manual_seed take seeds >= 0; refusing here, before any work,
    # keeps a bad seed from failing after the plan is built and leaving a half-made run
    if value < 0:
        raise ConfigError(f"{key} is {value}; expected a seed of 0 or more")


def is_device_name(value: str) -> bool:
    """auto, cpu, cuda or cuda:N. torch.device() accepts many more names (mps, meta, xla, ...) that
    ghsae's stages cannot run on, and raises a bare RuntimeError on others ("gpu", "")."""
    return value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value.removeprefix("cuda:").isdigit())


def _check_device(key: str, value: str) -> None:
    if not is_device_name(value):  # refused here, before any work
        raise ConfigError(f"{key} (--device) is {value!r}; expected auto, cpu, cuda or cuda:N (N a device number)")


def _check_finite(section: Any, name: str) -> None:
    """TOML reads nan and inf as floats: no setting of ghsae means either, and NaN passes every `<` check."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}.{f.name} is {value}; expected a finite number")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} is {value!r}; expected one of {', '.join(choices)}")


# --- reading TOML into the dataclasses -------------------------------------------------


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    sections: tuple[str, ...] | None = None,
) -> PipelineConfig:
    """Read pipeline.toml (the embedded default when path is None) and apply dotted overrides.

    overrides maps "section.key" to a value, e.g. {"harvest.tokens": 4096}; None values are ignored
    so CLI options that were not given leave the file's value in place.

    With `base` (a run's own settings, as a dict), the settings start from it instead, and a file
    given as `path` replaces only its `sections` (a section the file lacks becomes the defaults):
    `ghsae fit --config F` takes F's [fit], not F's [harvest].
    """
    if base is not None:
        raw = {k: dict(v) for k, v in base.items()}
        source = "the run's settings"
        if path is not None:
            file_raw, source = read_toml(path)
            for section in sections or tuple(file_raw):
                raw[section] = dict(file_raw.get(section, {}))
    else:
        raw, source = read_toml(path)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        _override(raw.setdefault(section, {}), key, value)
    return config_from_dict(raw, source=source)


def _override(table: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` ("k", or "topk.k" in the [fit.topk] table) where the file sets it: an override of a
    flat key the file sets in an architecture's table ([fit.topk] k) replaces it there."""
    if "." in key:
        name, key = key.split(".", 1)
        table = table.setdefault(name, {})
    for sub in table.values():
        if isinstance(sub, dict) and key in sub:
            sub[key] = value
            return
    table[key] = value


def read_toml(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """(the file's tables, its name); path None: the embedded pipeline.toml."""
    if path is None and not DEFAULT_CONFIG_PATH.is_file():
        # An installed (non-editable) copy has no pipeline.toml beside it; the dataclass
        # defaults are the same embedded default (a test keeps the two in step).
        return {}, "<defaults>"
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config with a pipeline.toml")
    try:
        return tomllib.loads(path.read_text()), str(path)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    sections = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    kwargs: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]; expected one of {', '.join(sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, found {type(table).__name__}")
        cls = typing.get_type_hints(PipelineConfig)[name]
        if cls is FitConfig:
            table = fit_tables(table, source)
        kwargs[name] = _build_section(cls, name, table, source)
    return PipelineConfig(**kwargs)


def config_from_run(resolved: dict[str, Any], source: str = "<run>") -> PipelineConfig:
    """A run's stored resolved config (config.json). A key it lacks was added after the run was made:
    it takes what such runs did (`added_later`'s `before`), not today's default, so the run keeps its
    behaviour and its identity."""
    raw = {k: dict(v) for k, v in resolved.items()}
    hints = typing.get_type_hints(PipelineConfig)
    for section in dataclasses.fields(PipelineConfig):
        table = raw.setdefault(section.name, {})
        for f in dataclasses.fields(hints[section.name]):
            if "before" in f.metadata and f.name not in table:
                table[f.name] = f.metadata["before"]
    return config_from_dict(raw, source=source)


def _build_section(cls: type, section: str, table: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {section}.{key}; expected one of {', '.join(sorted(known))}")
        if not _matches(value, hints[key]):
            raise ConfigError(
                f"{source}: {section}.{key} is {value!r} ({type(value).__name__}); expected {_type_name(hints[key])}"
            )
    return cls(**table)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def to_toml(cfg: PipelineConfig) -> str:
    """The resolved config as pipeline.toml text (what `ghsae config` prints)."""
    lines: list[str] = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items() if not isinstance(value, dict))
        lines.append("")
        for name, sub in table.items():  # an architecture's own table: [fit.<architecture>]
            if isinstance(sub, dict):
                lines.extend([f"[{section}.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in sub.items()), ""])
    return "\n".join(lines)
