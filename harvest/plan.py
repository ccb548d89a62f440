"""The plan: everything computed once per run before any shard is written.

Tokenise the dataset into packed contexts, measure layer similarity on the first probe_tokens,
partition the layers into groups, and fix the shard geometry. The plan is built in a private
staging folder and renamed into place, so concurrent batch jobs that race to plan the same run
leave exactly one plan, and every job then uses that one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ghsae.atomic import move_into_place
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError, ModelError, RunDirError
from ghsae.harvest.partition import amad, choose_groups, partition_scope, solve_grouping, too_many_groups
from ghsae.harvest.similarity import SimilarityResult, canonical_distance, distance_matrix, probe_similarity
from ghsae.harvest.text import dataset_description, iter_documents, iter_token_documents, pack_contexts, write_contexts
from ghsae.layers import span
from ghsae.layout import PLAN_FILE, SIMILARITY_FILE, TOKENS_FILE, RunLayout, group_name
from ghsae.lm import LoadedModel
from ghsae.locks import wait_lock
from ghsae.records import (
    STATS_FROM_STORED,
    DatasetIdentity,
    GroupingRecord,
    ModelIdentity,
    Plan,
    TokenizerIdentity,
    load_record,
    save_record,
)

log = logging.getLogger(__name__)

STATS_FROM = STATS_FROM_STORED
"""What a new plan's shards take their per-layer sums of: the rows as stored (harvest/shards.py)."""


def resolve_layers(spec: str | list[int], n_layers: int) -> list[int]:
    if isinstance(spec, str):  # "all": the only string GroupingConfig accepts
        return list(range(n_layers))
    first, last = spec
    if last >= n_layers:
        raise ConfigError(f"grouping.layers is [{first}, {last}] but the model has layers 0..{n_layers - 1}")
    return list(range(first, last + 1))


def check_model_fits(cfg: PipelineConfig, lm: LoadedModel) -> list[int]:
    layers = resolve_layers(cfg.grouping.layers, lm.n_layers)
    ctx = cfg.data.context_length
    if lm.max_context is not None and ctx > lm.max_context:
        raise ModelError(
            f"data.context_length is {ctx} but {lm.source.description} allows at most {lm.max_context} positions; "
            f"set data.context_length <= {lm.max_context}"
        )
    check_groups_fit(cfg.grouping.groups, layers, cfg.grouping.last_layer)
    lm.sites(cfg.harvest.hookpoint)  # a family without that activation is refused before tokenising
    return layers


def check_groups_fit(spec, layers: list[int], last_layer: str) -> None:
    """The cheap part of choose_groups, run before tokenising and probing (which take minutes); with
    last_layer = own, G counts the groups of every layer but the last."""
    n = len(layers)
    partitioned = partition_scope(n, last_layer, spec)
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > partitioned:
        raise ConfigError(too_many_groups(spec, n, partitioned, layers))
    if isinstance(spec, list):
        flat = [layer for a, b in spec for layer in range(a, b + 1)]
        if flat != layers:
            raise ConfigError(
                f"grouping.groups (--groups) {spec} must cover the harvested layers {layers[0]}..{layers[-1]} "
                "in order, each exactly once, with no gaps"
            )


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def context_batches(tokens: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for i in range(0, tokens.shape[0], batch_size):
        yield torch.from_numpy(np.array(tokens[i : i + batch_size])).long().to(device)


PlanBuilder = Callable[[Path], None]
"""Writes tokens.npy, similarity.npz and plan.json into the staging folder it is given."""


def model_plan_builder(cfg: PipelineConfig, lm: LoadedModel, progress: bool = True) -> PlanBuilder:
    """The plan of a direct harvest: tokenise the dataset, probe the model, partition."""
    return lambda staging: _build_plan(cfg, lm, check_model_fits(cfg, lm), staging, progress)


def ensure_plan(layout: RunLayout, build: PlanBuilder) -> Plan:
    """Load the run's plan, building it first if no job has yet (or rebuilding it if a file of it is gone).

    Under the plan lock, so concurrent jobs plan once: the others wait, then read its plan.
    """
    if plan_complete(layout):
        return load_record(Plan, layout.plan)
    with wait_lock(layout.lock("plan"), "the plan step"):
        if plan_complete(layout):
            return load_record(Plan, layout.plan)
        staging = layout.staging("plan")
        staging.mkdir(parents=True)
        try:
            build(staging)
            if layout.plan_dir.exists():
                _replace_damaged_plan(layout, staging)
            move_into_place(staging, layout.plan_dir)  # under the plan lock: no other process races here
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_record(Plan, layout.plan)


def plan_complete(layout: RunLayout) -> bool:
    """Every file of the plan step is there (a deleted tokens.npy or plan.json makes harvest rebuild it)."""
    return all(p.is_file() for p in (layout.plan, layout.tokens, layout.similarity))


# What a rebuilt plan must share with the damaged one for the shards already written to stay valid.
_PLAN_FIELDS_THAT_MUST_MATCH = ("config_hash", "model", "dataset", "groups", "n_shards", "layers", "hookpoint")


def _replace_damaged_plan(layout: RunLayout, staging) -> None:
    """A file of plan/ was deleted: the rebuilt plan replaces it if it equals what is left of the old one."""
    if layout.plan.is_file():
        old, new = load_record(Plan, layout.plan), load_record(Plan, staging / PLAN_FILE)
        if old.stats_from != new.stats_from:  # an older model-output plan keeps summing as its shards did
            new = dataclasses.replace(new, stats_from=old.stats_from)
            save_record(staging / PLAN_FILE, new)
        differ = [k for k in _PLAN_FIELDS_THAT_MUST_MATCH if getattr(old, k) != getattr(new, k)]
        if differ:
            raise RunDirError(
                f"{layout.plan_dir} is incomplete and rebuilding it gives a different plan ({', '.join(differ)} "
                "differ: the dataset or model changed); restore the missing file or start over with --overwrite"
            )
    log.warning("%s was incomplete; rebuilt it from the config and dataset", layout.plan_dir)
    shutil.rmtree(layout.plan_dir)


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made of besides its grouping: the model's identity and the probe's statistics.

    A direct harvest measures them (the model, the token stream, the probe); a derived run reads
    them from its all-layers source (harvest/derive.py). Either way `write_plan` turns them into
    the same similarity.npz and plan.json."""

    model: ModelIdentity
    tokenizer: TokenizerIdentity
    dataset: DatasetIdentity
    n_layers_model: int
    d_model: int
    layers: list[int]
    similarity: SimilarityResult


def _build_plan(cfg: PipelineConfig, lm: LoadedModel, layers: list[int], staging, progress: bool) -> None:
    t0 = time.perf_counter()
    ctx, hv = cfg.data.context_length, cfg.harvest
    n_harvest = math.ceil(hv.tokens / ctx)
    n_eval = math.ceil(hv.eval_tokens / ctx)
    tok = lm.tokenizer
    bos = tok.bos_token_id if cfg.data.prepend_bos else None
    eos = tok.eos_token_id
    _warn_missing_specials(tok, cfg.data.prepend_bos)
    docs = iter_documents(cfg.data.dataset, cfg.data.text_field, cfg.data.tokens_field)
    contexts = pack_contexts(iter_token_documents(docs, tok), ctx, bos, eos)
    dataset_hash = write_contexts(staging / TOKENS_FILE, contexts, n_harvest + n_eval, ctx, cfg.data.dataset)
    _check_token_ids(np.load(staging / TOKENS_FILE, mmap_mode="r"), lm)

    tokens = np.load(staging / TOKENS_FILE, mmap_mode="r")
    probe = tokens[: math.ceil(min(hv.probe_tokens, hv.tokens) / ctx)]
    bar = tqdm(total=2 * probe.size, unit="tok", unit_scale=True, desc="probe", disable=not progress)
    sim = probe_similarity(
        lm,
        lambda: context_batches(probe, hv.batch_size, lm.device),
        layers,
        bar,
        storage_dtype=cfg.storage.dtype,
        hookpoint=hv.hookpoint,
    )
    bar.close()
    inputs = PlanInputs(
        model=lm.identity,
        tokenizer=TokenizerIdentity(tokenizer_fingerprint(tok), bos, eos, tuple(lm.special_ids)),
        dataset=DatasetIdentity.from_json({**dataset_description(cfg.data.dataset), "fingerprint": dataset_hash}),
        n_layers_model=lm.n_layers,
        d_model=lm.d_model,
        layers=layers,
        similarity=sim,
    )
    write_plan(cfg, inputs, staging, t0)


def write_plan(cfg: PipelineConfig, inputs: PlanInputs, staging: Path, t0: float) -> Plan:
    """Partition the layers from the probe's distances and write similarity.npz and plan.json."""
    ctx, hv, gc = cfg.data.context_length, cfg.harvest, cfg.grouping
    n_harvest = math.ceil(hv.tokens / ctx)
    per_shard = hv.shard_tokens // ctx
    sim, layers = inputs.similarity, inputs.layers
    dist = distance_matrix(sim, gc.distance)
    solution = solve_grouping(dist, gc.method, gc.objective, gc.last_layer, gc.groups)
    groups = choose_groups(solution, gc.groups, gc.amad_threshold, layers)
    partitioned = len(solution.partitions)  # layers 0..partitioned-1; any after them: a group each
    chosen = groups[: len(groups) - (len(layers) - partitioned)]
    np.savez(
        staging / SIMILARITY_FILE,
        layers=np.array(layers),
        raw=sim.raw,
        centred=sim.centred,
        amad_curve=solution.amad,
        objective_curve=solution.value,
        probe_mean=sim.stats.mean,
        probe_mean_norm=sim.stats.mean_norm,
        probe_mean_sq_norm=sim.stats.mean_sq_norm,
    )
    plan = Plan(
        config_hash=cfg.identity_hash(),
        model=inputs.model,
        tokenizer=inputs.tokenizer,
        dataset=inputs.dataset,
        n_layers_model=inputs.n_layers_model,
        d_model=inputs.d_model,
        layers=tuple(layers),
        groups=tuple(tuple(g) for g in groups),
        group_names=tuple(group_name(i) for i in range(len(groups))),
        context_length=ctx,
        n_contexts_harvest=n_harvest,
        n_contexts_eval=math.ceil(hv.eval_tokens / ctx),
        contexts_per_shard=per_shard,
        n_shards=math.ceil(n_harvest / per_shard),
        shard_rows=hv.shard_tokens,
        grouping=GroupingRecord(
            distance=canonical_distance(gc.distance),
            method=solution.method,
            threshold=gc.amad_threshold,
            objective=solution.objective,
            curve=tuple(solution.amad.tolist()),
            objective_curve=tuple(solution.value.tolist()),
            chosen_groups=len(chosen),
            chosen_amad=_amad_of(dist, layers, chosen),
            last_layer="own" if partitioned < len(layers) else "grouped",
        ),
        probe_tokens=sim.tokens,
        seconds=time.perf_counter() - t0,  # tokenise + probe + partition: part of the report's harvest cost A
        stats_from=STATS_FROM,
        hookpoint=hv.hookpoint,
    )
    save_record(staging / PLAN_FILE, plan)
    log.info(
        "plan: %s: %s (%s distance, %s)",
        plan.grouping.describe(layers),
        [span(g) for g in groups],
        canonical_distance(gc.distance),
        f"dp, {solution.objective}" if solution.method == "dp" else solution.method,
    )
    return plan


def _amad_of(dist: np.ndarray, layers: list[int], groups: list[list[int]]) -> float:
    pos = {layer: i for i, layer in enumerate(layers)}
    return amad(dist, [[pos[x] for x in g] for g in groups])


def _warn_missing_specials(tok, prepend_bos: bool) -> None:
    name = type(tok).__name__
    if prepend_bos and tok.bos_token_id is None:
        log.warning("data.prepend_bos is set but the tokenizer (%s) has no BOS token: contexts start without one", name)
    if tok.eos_token_id is None:
        log.warning("the tokenizer (%s) has no EOS token: documents are packed with no separator between them", name)


def _check_token_ids(tokens: np.ndarray, lm: LoadedModel) -> None:
    vocab = lm.model.get_input_embeddings().num_embeddings
    top, bottom = int(tokens.max()), int(tokens.min())
    if top >= vocab or bottom < 0:
        bad = bottom if bottom < 0 else top
        raise ModelError(
            f"the dataset holds token id {bad} but the model's embedding has rows 0..{vocab - 1}; "
            "pre-tokenised input_ids must come from this model's tokenizer"
        )
