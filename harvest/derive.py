"""A grouped run derived from an all-layers run, without running the model.

An all-layers run (harvested with `--groups per-layer`) stores every harvested layer's residual
for every token. A grouped run stores, per token and group, the one layer its draw picked. Both
draws are pure functions of (plan, seed, shard) (shards.shard_draws), so for any partition the
grouped rows can be gathered from the all-layers rows: row r of group g holds kept token
k = order[r] at layer draw[g, k], which the source holds in row inverse_source[k] of that layer's
group. The plan is built from the source's token stream and probe (plan.write_plan, the same
function a direct harvest calls), and the per-layer sums are added up over the same rows in the
same order as a direct harvest adds them. So a derived run equals a direct harvest of that
partition in every byte (tested), except the wall-clock fields; RUN/derived.json says where it
came from (written before anything else, so an interrupted derivation resumes as one).

The seed need not be the source's: the source holds every layer of every kept token (which tokens are
kept does not depend on the seed), so any seed's layer draw and in-shard order can be gathered from it.
The source's own draw is recomputed with its own seed to find each token's row there. That is how the
seeds of a comparison (compare.seeds) get their own layer draws from the one model pass.

One model pass then serves a whole sweep over G (ghsae/sweep.py), and the per-layer SAEs of a
comparison train on the source itself. Equality with a direct harvest holds where the direct
harvest would compute the same activations and sums: the same model and batch size (the derived
config takes the source's batch size), on a CPU. A harvest on CUDA adds its sums up on the GPU,
so a run derived from a CUDA harvest has the same rows but sums that can differ in the last bits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ghsae.atomic import link_or_copy
from ghsae.cache.store import to_float32
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError
from ghsae.harvest.plan import PlanInputs, write_plan
from ghsae.harvest.rundir import claim_run_dir, prepare_run_dir
from ghsae.harvest.shards import (
    LayerSumsAccumulator,
    ShardSums,
    assemble_rows,
    commit_shard,
    row_inverse,
    shard_draws,
)
from ghsae.harvest.similarity import LayerStats, SimilarityResult
from ghsae.harvest.steps import claim_and_plan, claim_shards, recheck_done_shards
from ghsae.layout import TOKENS_FILE, RunLayout
from ghsae.locks import FileLock, hold_run
from ghsae.records import STATS_FROM_STORED, DerivedFrom, save_record
from ghsae.run import Run

log = logging.getLogger(__name__)

# Settings a derived run may choose for itself: how the layers are grouped. Everything else that
# decides what is stored must be the source's (the rows come from it).
GROUPING_KEYS = ("groups", "amad_threshold", "method", "objective", "distance", "last_layer")
# Harvest settings a derived run may choose too: the seed decides only which layer each kept token is
# drawn at and the rows' order, and the source holds every layer of every kept token.
HARVEST_KEYS = ("seed",)


FREE_KEYS = {("grouping", k) for k in GROUPING_KEYS} | {("harvest", k) for k in HARVEST_KEYS}


def derived_config(source: Run, cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with the source's harvest batch size (a runtime setting, but one that decides the
    activations' last bits), so the derived run equals what a direct harvest with it would store."""
    batch = source.settings().harvest.batch_size
    return dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, batch_size=batch))


def source_problems(source: Run, cfg: PipelineConfig) -> list[str]:
    """Why `source` cannot be derived from for `cfg` (empty: it can)."""
    problems = []
    if not source.plan.per_layer:
        problems.append(f"{source.root} is not an all-layers run (harvest it with --groups per-layer)")
    missing = source.missing_shards()
    if missing:
        problems.append(f"{source.root} is not fully harvested (shards {missing[:10]} missing)")
    mine, theirs = cfg.identity(), dict(source.config.identity)
    for section in sorted(set(mine) | set(theirs)):
        a, b = theirs.get(section, {}), mine.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) in FREE_KEYS:
                continue
            if a.get(key) != b.get(key):
                problems.append(f"{section}.{key} is {a.get(key)!r} in the source, {b.get(key)!r} here")
    return problems


def derive_run(
    source_dir: str | Path, cfg: PipelineConfig, run_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> Run:
    """Make (or resume) the run of `cfg`'s grouping at `run_dir` from the all-layers run at `source_dir`.

    Idempotent like a harvest: done shards are skipped (and verified), a shard is written under its
    lock and counts once its record is in place."""
    source = Run.open(source_dir)
    cfg = derived_config(source, cfg)
    problems = source_problems(source, cfg)
    if problems:
        raise ConfigError(f"cannot derive {run_dir} from {source.root}: {'; '.join(problems)}")
    layout = RunLayout(Path(run_dir))
    prepare_run_dir(layout, cfg, overwrite)
    with claim_run_dir(layout, cfg, overwrite):
        if layout.plan.is_file() and not layout.derived_from.is_file():
            raise ConfigError(
                f"{layout.root} holds a direct harvest; a derived run cannot be written into it. Derive into a new "
                "folder, or keep the direct harvest"
            )
        # the mark of a derived run goes first, so an interrupted derivation is never taken for a direct harvest
        save_record(layout.derived_from, DerivedFrom(_relative(source.root, layout.root), source.plan.config_hash))
    run = claim_and_plan(cfg, layout, lambda staging: _derived_plan(source, cfg, staging), source.plan.model, overwrite)
    recheck_done_shards(run, list(range(run.plan.n_shards)))
    todo = run.missing_shards()
    if todo:
        # the source is read throughout: hold its run lock too, so no --overwrite removes it meanwhile
        with hold_run(layout), hold_run(source.layout):
            _derive_shards(source, run, cfg, todo, progress)
    done = Run.open(layout.root)
    done.finish(wrote=bool(todo))
    return done


def _relative(source: Path, run: Path) -> str:
    """The source as a path relative to the derived run (it moves with a copied folder), else absolute."""
    try:
        return os.path.relpath(source.resolve(), run.resolve())
    except ValueError:  # another drive (Windows)
        return str(source.resolve())


def _derived_plan(source: Run, cfg: PipelineConfig, staging: Path) -> None:
    """tokens.npy (a hard link to the source's where the disk allows), similarity.npz and plan.json,
    from the source's token stream and probe."""
    t0 = time.perf_counter()
    link_or_copy(source.layout.tokens, staging / TOKENS_FILE)
    plan = source.plan
    with np.load(source.layout.similarity) as z:
        layers = z["layers"].tolist()
        stats = LayerStats(layers, plan.probe_tokens, z["probe_mean"], z["probe_mean_norm"], z["probe_mean_sq_norm"])
        sim = SimilarityResult(layers, z["raw"], z["centred"], stats, plan.probe_tokens)
    inputs = PlanInputs(plan.model, plan.tokenizer, plan.dataset, plan.n_layers_model, plan.d_model, layers, sim)
    written = write_plan(cfg, inputs, staging, t0)
    assert written.stats_from == STATS_FROM_STORED, "a derived run's sums are of the stored rows"


def _derive_shards(source: Run, run: Run, cfg: PipelineConfig, todo: list[int], progress: bool) -> None:
    bar = tqdm(total=len(todo), unit="shard", desc=f"derive {run.root.name}", disable=not progress)
    held: list[FileLock] = []
    source_seed = source.settings().harvest.seed
    try:
        for shard, lock in claim_shards(run, todo, held):
            t0 = time.perf_counter()
            rows, sums = derive_shard(source, run, cfg, shard, source_seed)
            commit_shard(run.layout, run.store, run.plan, shard, rows, sums, time.perf_counter() - t0)
            lock.release()
            bar.update()
    finally:
        for lock in held:
            lock.release()
        bar.close()


def derive_shard(source: Run, run: Run, cfg: PipelineConfig, shard: int, source_seed: int):
    """One shard's rows per group (in row order, storage dtype) and its per-layer sums. source_seed: the
    source's harvest.seed (its rows' order), which may differ from cfg's."""
    plan, splan = run.plan, source.plan
    start, stop = plan.shard_contexts(shard)
    tokens_CT = np.array(run.tokens()[start:stop])
    mine = shard_draws(plan, cfg.harvest.seed, shard, tokens_CT)
    theirs = shard_draws(splan, source_seed, shard, tokens_CT)  # where each token sits in the source
    assert np.array_equal(mine.kept, theirs.kept), "the same tokens are kept in both runs"
    mine_row, their_row = row_inverse(mine), row_inverse(theirs)
    T, B = tokens_CT.shape[1], cfg.harvest.batch_size
    # the kept tokens of each batch of contexts, as the direct harvest's forward passes see them
    bounds = [np.searchsorted(mine.kept, [b0 * T, min(b0 + B, tokens_CT.shape[0]) * T]) for b0 in range(0, tokens_CT.shape[0], B)]
    acc = LayerSumsAccumulator(len(plan.layers), plan.d_model, torch.device("cpu"))
    verify = source.verifier()
    acts = []
    for gi, group in enumerate(plan.groups):
        out = np.empty((mine.kept.size, plan.d_model), dtype=run.store.geometry.physical_dtype)
        for layer in group:
            src_group = splan.group_names[splan.layers.index(layer)]
            verify(src_group, shard)
            src = source.store.read_shard(src_group, shard, source.shard_record(shard).groups[src_group].rows).acts
            ks = np.flatnonzero(mine.layers[gi] == layer)  # kept tokens drawn to this layer, in position order
            drawn = src[their_row[ks]]
            out[mine_row[ks]] = drawn
            drawn_float32 = torch.from_numpy(to_float32(drawn, run.store.geometry.dtype))  # what a direct harvest sums
            for k0, k1 in bounds:  # batch by batch, as a direct harvest adds them up
                first, stop = np.searchsorted(ks, [k0, k1])  # ks ascends: a batch's tokens are one slice
                acc.add(plan.layers.index(layer), drawn_float32[first:stop])
        acts.append(out)
    sums: ShardSums = acc.sums(plan.layers)
    return assemble_rows(plan, mine, tokens_CT, start, acts), sums
