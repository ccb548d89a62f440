"""`ghsae fit`: one SAE per group, trained from the run's activation store.

Each group's SAE serves the layers of its group: it carries one normalisation factor per layer
(sqrt(d) / E||x||, from the harvest's statistics over every stored row), and its loader
normalises each row by the factor of the layer it was drawn from.

With fit.centre, each layer's mean is subtracted first and the factor is sqrt(d) / E||x - mean||,
so the centred rows have E||x - mean|| = sqrt(d) (the factor of the uncentred norm would leave
them 0.62-1.13 of that on SmolLM2, issue 10). The shard records' sums give E||x - mean||^2
exactly (E||x||^2 - ||mean||^2) but not E||x - mean||, which differs from that RMS by the spread
of the centred norms; so E||x - mean|| is measured in one pass over the group's stored rows (the
rows the SAE trains on, one layer's rows being exactly those stored for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ghsae.cache.loader import ActivationLoader, GroupReader, layer_lookup_table
from ghsae.cache.manifest import (
    NormStats,
    Plan,
    aggregate_stats,
    done_shards,
    group_shard_rows,
    load_plan,
    read_json,
)
from ghsae.cache.store import ActivationStore
from ghsae.cache.verify import ShardVerifier
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError, StoreError
from ghsae.harvest.model import pick_device
from ghsae.layout import SAE_WEIGHTS, RunLayout
from ghsae.locks import hold_run, wait_lock
from ghsae.train.io import CHECKPOINT, METRICS, SAE_CONFIG, load_sae, save_sae
from ghsae.train.provenance import provenance, provenance_diffs
from ghsae.train.sae import SAEConfig, SparseAutoencoder, build_sae, dead_window
from ghsae.train.trainer import ResumeRefused, Trainer

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    group: str
    layers: list[int]
    tokens: int
    steps: int
    final_fvu: float | None
    folder: str


def fit(
    cfg: PipelineConfig,
    run_dir: str | Path,
    groups: list[str] | None = None,
    allow_partial: bool = False,
    progress: bool = True,
    restart: bool = False,
) -> list[FitResult]:
    """Train (or resume, or skip when already trained with these settings on this store) each group's SAE.

    restart (--overwrite): an SAE trained or begun with other settings or another store is started
    over instead of refused.
    """
    layout = RunLayout(Path(run_dir))
    plan = load_plan(layout)
    done = done_shards(layout, plan)
    if len(done) < plan.n_shards and not allow_partial:
        missing = [s for s in range(plan.n_shards) if s not in set(done)]
        raise StoreError(
            f"{layout.root} is incomplete: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"({len(missing)} of {plan.n_shards}) are not harvested. Finish `ghsae harvest`, or pass --allow-partial"
        )
    if not done:
        raise StoreError(f"{layout.root} has no harvested shard; run `ghsae harvest` first")
    names = selected_groups(plan, groups)
    pick_device(cfg.fit.device, option="fit.device (--device)")  # a bad device fails before any work
    with hold_run(layout):
        stats = aggregate_stats(layout, plan, done)  # once: every group's SAE takes its layers' rows of it
        return [fit_group(cfg, layout, plan, name, done, stats, progress, restart) for name in names]


def selected_groups(plan: Plan, groups: list[str] | None) -> list[str]:
    """The groups to train: those named (each checked against the run), or every group."""
    names = groups or plan.group_names
    unknown = [g for g in names if g not in plan.group_names]
    if unknown:
        raise ConfigError(f"--group {unknown[0]} is not in this run; it has {', '.join(plan.group_names)}")
    return names


def fit_group(
    cfg: PipelineConfig,
    layout: RunLayout,
    plan: Plan,
    group: str,
    shards: list[int],
    stats: NormStats,
    progress: bool,
    restart: bool = False,
) -> FitResult:
    """One group's SAE, under its lock: a second process fitting the same group waits, then finds it done."""
    with wait_lock(layout.lock(f"sae-{group}"), f"the SAE of {group}"):
        record = provenance(cfg, layout, plan, group, shards)
        done = _already_trained(layout, group, record, restart)
        if done is not None:
            return done
        return _train_group(cfg, layout, plan, group, shards, stats, progress, record, restart)


def _already_trained(layout: RunLayout, group: str, record: dict, restart: bool) -> FitResult | None:
    """The FitResult of an SAE already trained with these settings on this store (nothing is written);
    None when it must be trained. One trained otherwise is refused, or with restart removed."""
    folder = layout.sae_dir(group)
    if not layout.sae_trained(group):
        return None
    meta = read_json(folder / SAE_CONFIG, fix=f"delete {folder} to train this SAE again")
    saved = meta.get("provenance")
    if saved is None and "fit" in meta:  # cfg.json of an older ghsae: its fit settings, no store state
        saved = {"fit": {k: v for k, v in meta["fit"].items() if k in record["fit"]}, "store": record["store"]}
    diffs = provenance_diffs(saved, record, "trained SAE")
    if not diffs:
        log.info("%s is already trained with these settings on this store; nothing to do", group)
        layers = meta["sae"]["layers"]
        return FitResult(group, layers, int(meta.get("tokens", 0)), int(meta.get("steps", 0)), None, str(folder))
    if not restart:
        raise ResumeRefused(
            f"{folder} was trained differently ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}). "
            "Pass --overwrite to train it again with these settings, or restore the settings it was trained with"
        )
    log.warning("--overwrite: training %s again (it was trained differently: %s)", group, "; ".join(diffs[:4]))
    for name in (SAE_WEIGHTS, SAE_CONFIG, CHECKPOINT, METRICS):  # ghsae's files only
        (folder / name).unlink(missing_ok=True)
    return None


def _train_group(
    cfg: PipelineConfig,
    layout: RunLayout,
    plan: Plan,
    group: str,
    shards: list[int],
    stats: NormStats,
    progress: bool,
    record: dict,
    restart: bool,
) -> FitResult:
    fc = cfg.fit
    device = pick_device(fc.device, option="fit.device (--device)")
    gi = plan.group_names.index(group)
    layers = plan.groups[gi]
    d = int(plan.data["d_model"])
    scale_np, mean_np = stats.for_layers(layers, d)
    scale = torch.from_numpy(scale_np).float()
    mean = torch.from_numpy(mean_np).float() if fc.centre else None
    store = ActivationStore.open(layout.acts)
    rows = group_shard_rows(layout, plan, group, shards)
    verifier = ShardVerifier(layout, plan, store)
    if mean is not None:
        reader = GroupReader(store, group, rows, verify=verifier)
        scale = centred_scale(
            ActivationLoader(reader, 4096, 0, torch.device("cpu"), layers, torch.ones(len(layers)), mean), layers, d
        )

    torch.manual_seed(fc.seed * 1_000_003 + gi)  # distinct, reproducible initialisation per group
    sae = build_sae(
        SAEConfig(
            architecture=fc.architecture,
            d_model=d,
            n_latents=fc.expansion * d,
            layers=layers,
            k=min(fc.k, fc.expansion * d),
            aux_coef=fc.aux_coef,
            auxk_normalisation=fc.auxk_normalisation,
            sparsity_coef=fc.sparsity_coef,
            extra={"run": str(layout.root), "group": group, "config_hash": plan.data["config_hash"]},
        )
    )
    sae.set_normalisation(scale, mean)
    reader = GroupReader(store, group, rows, verify=verifier)
    loader = ActivationLoader(reader, fc.batch_size, fc.seed, device, layers, scale, mean)
    sae.to(device)
    if fc.init_from:
        _init_from(sae, Path(fc.init_from))
    else:
        _init_b_dec(sae, loader)
    total = fc.tokens or loader.rows_per_epoch
    sae.cfg.dead_tokens = dead_window(fc.dead_tokens, total)  # recorded in cfg.json with the SAE
    out_dir = layout.sae_dir(group)
    trainer = Trainer(fc, sae, loader, out_dir, total, name=f"fit {group}", provenance=record, restart=restart)
    state = trainer.run(progress)
    save_sae(
        sae,
        out_dir,
        {
            "fit": cfg.to_dict()["fit"],
            "provenance": record,
            "tokens": state.tokens,
            "steps": state.step,
            "seconds": state.seconds,
        },
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
        f"{r.group} (layers {r.layers[0]}-{r.layers[-1]}): {r.tokens:,} tokens, {r.steps} steps, "
        f"final batch FVU {r.final_fvu:.3f} -> {r.folder}"
        if r.final_fvu is not None
        else f"{r.group}: already trained with these settings on this store ({r.steps} steps); nothing to do"
        if r.steps
        else f"{r.group}: no steps"
        for r in results
    ]
