"""`ghsae fit`: one SAE per group, trained from the run's activation store.

Each group's SAE serves the layers of its group: it carries one normalisation factor per layer
(sqrt(d) / E||x||, from the harvest's statistics over every stored row), and its loader
normalises each row by the factor of the layer it was drawn from.

With fit.centre, each layer's mean is subtracted first and the factor is sqrt(d) / E||x - mean||,
so the centred rows have E||x - mean|| = sqrt(d) (the factor of the uncentred norm would leave
them off that target by the size of the mean, which differs per layer). The shard records' sums give E||x - mean||^2
exactly (E||x||^2 - ||mean||^2) but not E||x - mean||, which differs from that RMS by the spread
of the centred norms; so E||x - mean|| is measured in one pass over the group's stored rows (the
rows the SAE trains on, one layer's rows being exactly those stored for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ghsae.cache.loader import ActivationLoader, GroupReader
from ghsae.cache.stats import NormStats
from ghsae.config import FitConfig, PipelineConfig
from ghsae.device import pick_device
from ghsae.errors import ConfigError, DamagedFileError, StoreError
from ghsae.layers import layer_lookup_table, span
from ghsae.layout import SAE_CONFIG, SAE_FILES, SAE_WEIGHTS
from ghsae.locks import hold_run, wait_lock
from ghsae.records import HOOKPOINT_DEFAULT, Provenance, SAERecord
from ghsae.run import Run
from ghsae.sae import (
    REGISTRY,
    SAEConfig,
    SAELoadError,
    SparseAutoencoder,
    build_sae,
    dead_window,
    load_sae,
    read_sae,
    save_sae,
)
from ghsae.train.provenance import (
    fit_settings,
    provenance,
    provenance_diffs,
    recorded_run_fit,
    run_fit_settings,
    settings_diffs,
)
from ghsae.train.tracking import Tracking, check_installed
from ghsae.train.trainer import ResumeRefused, Trainer

log = logging.getLogger(__name__)

FIT_DEVICE_OPTION = "fit.device (--device)"


@dataclass
class FitResult:
    group: str
    layers: list[int]
    tokens: int
    steps: int
    final_fvu: float | None
    folder: str


def shards_to_fit(run: Run, allow_partial: bool) -> list[int]:
    """The done shards an SAE trains on: all of them, or (allow_partial) those harvested so far."""
    done = run.done_shards()
    missing = run.missing_shards()
    if missing and not allow_partial:
        raise StoreError(
            f"{run.root} is incomplete: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"({len(missing)} of {run.plan.n_shards}) are not harvested. Finish `ghsae harvest`, or pass --allow-partial"
        )
    if not done:
        raise StoreError(f"{run.root} has no harvested shard; run `ghsae harvest` first")
    return done


def selected_groups(run: Run, groups: list[str] | None) -> list[str]:
    """The groups to train: those named (each checked against the run), or every group."""
    names = groups or list(run.plan.group_names)
    for g in names:
        run.check_group(g, option="--group ")
    return names


def check_fit_settings(run: Run, cfg: PipelineConfig, overwrite: bool) -> list[str]:
    """Refuse a k the SAEs cannot have (check_k), and fit settings other than the ones the run's SAEs
    are trained with (saes/fit.json, or the trained SAEs' own records in a run from before that file),
    listing the differing keys, unless `overwrite`; returns those differences. Nothing is written here."""
    check_k(cfg.fit, run.plan.d_model)
    recorded = recorded_run_fit(run)
    if recorded is None:
        return []
    saved, where = recorded
    diffs = settings_diffs(saved, run_fit_settings(fit_settings(cfg)), where)
    if diffs and not overwrite:
        source = run.layout.fit_settings if where == "run" else run.layout.sae_dir(where.split()[-1])
        raise ResumeRefused(
            f"{source}: this run's SAEs are trained with other fit settings "
            f"({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}). Drop --config / the flags to use the "
            "run's own, or pass --overwrite to train its SAEs again with these"
        )
    if diffs:
        log.warning(
            "--overwrite: the run's fit settings change (%s); its SAEs trained otherwise are trained again "
            "when fitted, and the report refuses those not yet retrained",
            "; ".join(diffs[:4]),
        )
    return diffs


def fit_group(
    run: Run,
    cfg: PipelineConfig,
    group: str,
    shards: list[int],
    *,
    stats: NormStats | None = None,
    progress: bool = True,
    restart: bool = False,
) -> FitResult:
    """One group's SAE, under its lock: a second process fitting the same group waits, then finds it done.

    Trains (or resumes, or skips when already trained with these settings on this store) the SAE.
    stats: the run's statistics over `shards`, when the caller added them up once for every group.
    restart (--overwrite): an SAE trained or begun with other settings or another store is started
    over instead of refused.
    """
    pick_device(cfg.fit.device, option=FIT_DEVICE_OPTION)  # a bad device fails before any work
    check_k(cfg.fit, run.plan.d_model)
    check_installed(cfg.fit.log)  # and a tracker that is not installed
    with hold_run(run.layout), wait_lock(run.layout.lock(f"sae-{group}"), f"the SAE of {group}"):
        record = provenance(cfg, run, group, shards)
        done = _already_trained(run, group, record, restart)
        if done is not None:
            return done
        return _train_group(run, cfg, group, shards, stats or run.norm_stats(shards), progress, record, restart)


def _already_trained(run: Run, group: str, record: Provenance, restart: bool) -> FitResult | None:
    """The FitResult of an SAE already trained with these settings on this store (nothing is written);
    None when it must be trained. One trained otherwise is refused, or with restart removed; a damaged
    one is removed (see _damaged)."""
    folder = run.layout.sae_dir(group)
    if not run.sae_trained(group) or _damaged(folder):
        return None
    meta = run.sae_record(group)
    saved = meta.provenance
    if saved is None and meta.fit:  # cfg.json of an older ghsae: its fit settings, no store state
        saved = Provenance({k: v for k, v in meta.fit.items() if k in record.fit}, record.store)
    diffs = provenance_diffs(saved, record, "trained SAE")
    if not diffs:
        log.info("%s is already trained with these settings on this store; nothing to do", group)
        return FitResult(group, meta.layers, meta.tokens, meta.steps, None, str(folder))
    if not restart:
        raise ResumeRefused(
            f"{folder} was trained differently ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}). "
            "Pass --overwrite to train it again with these settings, or restore the settings it was trained with"
        )
    log.warning("--overwrite: training %s again (it was trained differently: %s)", group, "; ".join(diffs[:4]))
    for name in SAE_FILES:  # ghsae's files only
        (folder / name).unlink(missing_ok=True)
    return None


def _damaged(folder: Path) -> bool:
    """A trained SAE whose files fail their check (cfg.json, the weights' checksum, their shapes) is
    not trained: its record and weights are removed, with a warning, so that it is fitted again (from
    its checkpoint when that holds the finished training, which gives the same weights)."""
    try:
        read_sae(folder, fix="fit trains it again")
    except (SAELoadError, DamagedFileError) as e:
        log.warning("%s", e)
        for name in (SAE_WEIGHTS, SAE_CONFIG):
            (folder / name).unlink(missing_ok=True)
        return True
    return False


def check_k(fc: FitConfig, d_model: int) -> None:
    """Refuse a TopK-family k above the dictionary size before any work: an SAE cannot keep more
    latents a token than it has, and a k it does not use must not be recorded as its setting."""
    m = fc.expansion * d_model
    if REGISTRY[fc.architecture].keeps_k and fc.k > m:
        raise ConfigError(
            f"fit.k is {fc.k} but this run's SAEs have {m} latents (fit.expansion {fc.expansion} x d_model {d_model}); "
            f"expected fit.k from 1 to {m}: lower [fit] k or raise [fit] expansion in the --config file"
        )


@dataclass
class GroupLoader:
    """A group's training batches and the normalisation they are put in (the SAE carries the same)."""

    layers: list[int]
    scale: torch.Tensor  # [len(layers)] per-layer factor
    mean: torch.Tensor | None  # [len(layers), d] per-layer mean, with fit.centre
    loader: ActivationLoader


def group_loader(
    run: Run,
    fc: FitConfig,
    group: str,
    shards: list[int],
    device: torch.device,
    *,
    batch_size: int | None = None,
    stats: NormStats | None = None,
) -> GroupLoader:
    """The loader `ghsae fit` trains `group` from (also what bench/fit.py measures): its rows in
    `shards`, each shard verified on first read, normalised per layer (and centred with fit.centre)."""
    layers, d = list(run.plan.group_layers(group)), run.plan.d_model
    scale_np, mean_np = (stats or run.norm_stats(shards)).for_layers(layers, d)
    scale = torch.from_numpy(scale_np).float()
    mean = torch.from_numpy(mean_np).float() if fc.centre else None
    rows = run.group_rows(group, shards)
    verifier = run.verifier()
    if mean is not None:
        reader = GroupReader(run.store, group, rows, verify=verifier)
        centring = ActivationLoader(reader, 4096, 0, torch.device("cpu"), layers, torch.ones(len(layers)), mean)
        scale = centred_scale(centring, layers, d)
    reader = GroupReader(run.store, group, rows, verify=verifier)
    outlier_norm = _outlier_norms(run, fc, layers, shards) if fc.outliers != "keep" else None
    loader = ActivationLoader(
        reader,
        batch_size or fc.batch_size,
        fc.seed,
        device,
        layers,
        scale,
        mean,
        outliers=fc.outliers,
        outlier_norm=outlier_norm,
    )
    return GroupLoader(layers, scale, mean, loader)


def _outlier_norms(run: Run, fc: FitConfig, layers: list[int], shards: list[int]) -> torch.Tensor:
    """[len(layers)] each layer's outlier norm in raw units: fc.outlier_factor x its median norm, over
    the shards trained on (the harvest's statistics file once it is complete; --allow-partial adds up
    the done shards' histograms)."""
    norms = run.norm_distribution() if run.complete() else run.norm_stats(shards).norms
    if norms is None:
        raise StoreError(
            f"fit.outliers is {fc.outliers!r} but {run.root} records no token-norm distribution (harvested "
            f'before ghsae counted norms); set fit.outliers = "keep", or harvest again into a new --run-dir'
        )
    threshold = norms.threshold(fc.outlier_factor)
    return torch.tensor([threshold[norms.layers.index(layer)] for layer in layers], dtype=torch.float32)


def sae_extra(run: Run, group: str) -> dict:
    """What an SAE's cfg.json says of where it comes from; the hookpoint only where it is not
    resid_post, so the records of resid_post runs stay as they were."""
    extra = {"run": str(run.root), "group": group, "config_hash": run.plan.config_hash}
    if run.plan.hookpoint != HOOKPOINT_DEFAULT:
        extra["hookpoint"] = run.plan.hookpoint
    return extra


def _train_group(
    run: Run,
    cfg: PipelineConfig,
    group: str,
    shards: list[int],
    stats: NormStats,
    progress: bool,
    record: Provenance,
    restart: bool,
) -> FitResult:
    fc, plan = cfg.fit, run.plan
    device = pick_device(fc.device, option=FIT_DEVICE_OPTION)
    gi = plan.group_names.index(group)
    d = plan.d_model
    data = group_loader(run, fc, group, shards, device, stats=stats)
    layers, loader = data.layers, data.loader

    torch.manual_seed(fc.seed * 1_000_003 + gi)  # distinct, reproducible initialisation per group
    sae = build_sae(
        SAEConfig(
            architecture=fc.architecture,
            d_model=d,
            n_latents=fc.expansion * d,
            layers=layers,
            **REGISTRY[fc.architecture].config_fields(fc),
            extra=sae_extra(run, group),
        )
    )
    sae.set_normalisation(data.scale, data.mean)
    sae.to(device)
    donor = transfer_source(run, fc, group)
    if donor is not None:
        _init_from(sae, donor)
        sae.cfg.extra["init_from"] = str(donor)  # recorded in cfg.json with the SAE
    else:
        _init_b_dec(sae, loader)
    total = fc.tokens or loader.rows_per_epoch
    sae.cfg.dead_tokens = dead_window(fc.dead_tokens, total)  # recorded in cfg.json with the SAE
    out_dir = run.layout.sae_dir(group)
    tracking = Tracking(fc.log, run.layout, group, {**cfg.to_dict()["fit"], "layers": layers}) if fc.log else None
    trainer = Trainer(
        fc, sae, loader, out_dir, total, name=f"fit {group}", provenance=record, restart=restart, tracking=tracking
    )
    state = trainer.run(progress)
    save_sae(
        sae,
        out_dir,
        SAERecord(
            sae={},
            fit=cfg.to_dict()["fit"],
            provenance=record,
            tokens=state.tokens,
            steps=state.step,
            seconds=state.seconds,
        ),
    )
    final = state.metrics[-1]["fvu"] if state.metrics else None
    return FitResult(group, layers, state.tokens, state.step, final, str(out_dir))


@torch.no_grad()
def centred_scale(centring: ActivationLoader, layers: list[int], d_model: int) -> torch.Tensor:
    """Per layer, sqrt(d) / E||x - mean|| over one epoch of a loader that only centres (scale 1)."""
    lookup = layer_lookup_table(layers)
    norm_sum = torch.zeros(len(layers), dtype=torch.float64)
    count = torch.zeros(len(layers), dtype=torch.float64)
    for batch in centring.batches(0):
        at = lookup[batch.layer.cpu()]
        norm_sum.index_add_(0, at, batch.x.double().norm(dim=-1).cpu())
        count.index_add_(0, at, torch.ones(len(at), dtype=torch.float64))
    if bool((count == 0).any()):
        empty = [layers[i] for i in torch.nonzero(count == 0).flatten().tolist()]
        raise StoreError(f"fit.centre needs rows of every layer; the store holds none for layers {empty}")
    return (d_model**0.5 / (norm_sum / count).clamp_min(1e-12)).float()


@torch.no_grad()
def _init_b_dec(sae: SparseAutoencoder, loader: ActivationLoader) -> None:
    """b_dec starts at the mean of the first batch (in normalised space), so early latents model deviations."""
    first = next(loader.batches(0), None)
    if first is not None:
        sae.b_dec.copy_(first.x.mean(dim=0))


def transfer_source(run: Run, fc: FitConfig, group: str) -> Path | None:
    """The trained SAE this group's starts from: fit.init_from, or with fit.transfer =
    previous-group the previous group's of this run (None for the first group: from scratch)."""
    if fc.init_from:
        return Path(fc.init_from)
    gi = run.plan.group_names.index(group)
    if fc.transfer == "none" or gi == 0:
        return None
    previous = run.plan.group_names[gi - 1]
    if not run.sae_trained(previous):
        raise StoreError(
            f"fit.transfer = previous-group: {group} starts from {previous}'s SAE, which is not trained; "
            f"fit the groups in order (`ghsae fit --run-dir {run.root}` does)"
        )
    return run.layout.sae_dir(previous)


@torch.no_grad()
def _init_from(sae: SparseAutoencoder, folder: Path) -> None:
    """Transfer: copy another trained SAE's weights, keep this group's normalisation."""
    source = load_sae(folder, device=sae.W_dec.device)
    if (source.cfg.d_model, source.cfg.n_latents, source.cfg.architecture) != (
        sae.cfg.d_model,
        sae.cfg.n_latents,
        sae.cfg.architecture,
    ):
        raise ConfigError(
            f"fit.init_from {folder} is a {source.cfg.architecture} SAE with d={source.cfg.d_model}, m={source.cfg.n_latents}; "
            f"this group needs {sae.cfg.architecture} with d={sae.cfg.d_model}, m={sae.cfg.n_latents}"
        )
    own = {k: v for k, v in sae.state_dict().items() if k.startswith("norm_") or k == "layer_lookup"}
    state = {k: v for k, v in source.state_dict().items() if k in sae.state_dict() and k not in own}
    state["tokens_since_fired"] = torch.zeros_like(sae.tokens_since_fired)
    sae.load_state_dict({**sae.state_dict(), **state})
    log.info("initialised from %s (layers %s)", folder, source.cfg.layers)


def summary_lines(results: list[FitResult]) -> list[str]:
    return [
        f"{r.group} ({'layers' if len(r.layers) > 1 else 'layer'} {span(r.layers)}): {r.tokens:,} tokens, {r.steps} steps, "
        f"final batch FVU {r.final_fvu:.3f} -> {r.folder}"
        if r.final_fvu is not None
        else f"{r.group}: already trained with these settings on this store ({r.steps} steps); nothing to do"
        if r.steps
        else f"{r.group}: no steps"
        for r in results
    ]
