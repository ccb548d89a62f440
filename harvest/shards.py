"""One shard of the harvest: a pure function of (plan, seed, shard).

Shard s covers contexts [s*C, (s+1)*C) of plan/tokens.npy. For each non-special token and each
group, one layer of the group is drawn uniformly (Group-SAE subsampling: each layer of a group
gets about 1/|g| of the tokens), from a generator seeded by (seed, s) alone. Rows are shuffled
inside the shard by one permutation shared by all groups, so row r of every group is the same
token. Because nothing depends on which process runs the shard or what ran before, one process,
N processes, or a killed and resumed run write the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ghsae import faults
from ghsae.atomic import save_npz_atomic
from ghsae.cache.dtypes import storage_dtype as dtype_named
from ghsae.cache.norms import NormCounter
from ghsae.cache.store import ActivationStore, ShardRows, to_storage
from ghsae.harvest.finite import ActivationGuard
from ghsae.hooks import capture_layers
from ghsae.layout import RunLayout
from ghsae.lm import LoadedModel
from ghsae.records import STATS_FROM_STORED, GroupRows, LayerSums, Plan, ShardRecord, save_record


@dataclass
class ShardDraws:
    kept: np.ndarray  # [n] flat positions (into the shard's [C*T] tokens) that are stored
    layers: np.ndarray  # [G, n] model layer drawn for each stored token, per group
    order: np.ndarray  # [n] row r of the shard holds kept token order[r]


def shard_draws(plan: Plan, seed: int, shard: int, tokens_CT: np.ndarray) -> ShardDraws:
    flat = tokens_CT.reshape(-1)
    kept = np.flatnonzero(~np.isin(flat, plan.tokenizer.special_ids))
    rng = np.random.default_rng([seed, shard])
    # Draw for every position, special or not, so a draw depends only on its position.
    layers = np.stack([np.asarray(g)[rng.integers(0, len(g), size=flat.size)][kept] for g in plan.groups])
    order = rng.permutation(kept.size)
    return ShardDraws(kept=kept, layers=layers, order=order)


@dataclass
class ShardSums:
    """A shard's per-layer sums: the counts and norm sums go into its record, sum_x into its .npz."""

    sum_x: np.ndarray  # [L, d] float64
    layers: dict[int, LayerSums]
    norm_hist: np.ndarray  # [L, norms.N_BINS] int64: each layer's token norms, binned (cache/norms.py)
    max_norm: np.ndarray  # [L] float64


class LayerSumsAccumulator:
    """Per-layer sums of one shard's stored rows (count, sum x, sum ||x||, sum ||x||^2), in float64
    on the harvest's device (the rows are checked first by a harvest.finite.ActivationGuard).

    A plan with stats_from = "stored-rows" (every new plan) sums the rows as stored
    (after the cast to the storage dtype), so a store derived from an all-layers harvest
    (harvest/derive.py) reproduces them exactly; older plans summed the model's output before the
    cast ("model-output"). Rows are added per batch and layer, in the same order either way.
    """

    def __init__(self, n_layers: int, d_model: int, device: torch.device):
        f64 = torch.float64
        self.sum_x = torch.zeros(n_layers, d_model, dtype=f64, device=device)
        self.sum_norm = torch.zeros(n_layers, dtype=f64, device=device)
        self.sum_sq = torch.zeros(n_layers, dtype=f64, device=device)
        self.count = torch.zeros(n_layers, dtype=torch.int64, device=device)
        self.norms = NormCounter(n_layers, device)

    def add(self, i: int, rows: torch.Tensor) -> None:
        """Add rows [n, d] (float32) of the layer at position i."""
        if rows.shape[0] == 0:
            return
        norms = rows.norm(dim=1).double()
        self.sum_x[i] += rows.sum(dim=0, dtype=torch.float64)
        self.sum_norm[i] += norms.sum()
        self.sum_sq[i] += (norms * norms).sum()
        self.count[i] += rows.shape[0]
        self.norms.add(i, norms)

    def sums(self, layers: tuple[int, ...]) -> ShardSums:
        norm_hist, max_norm = self.norms.arrays()
        return ShardSums(
            norm_hist=norm_hist,
            max_norm=max_norm,
            sum_x=self.sum_x.cpu().numpy(),
            layers={
                layer: LayerSums(int(self.count[i]), float(self.sum_norm[i]), float(self.sum_sq[i]))
                for i, layer in enumerate(layers)
            },
        )


def assemble_rows(
    plan: Plan, draws: ShardDraws, tokens_CT: np.ndarray, start: int, acts: list[np.ndarray]
) -> dict[str, ShardRows]:
    """Each group's ShardRows from its activations [n, d] (physical dtype, already in row order)."""
    T = tokens_CT.shape[1]
    kept_sorted = draws.kept[draws.order]
    token = tokens_CT.reshape(-1)[kept_sorted].astype(np.int32)
    seq = (start + kept_sorted // T).astype(np.int32)
    pos = (kept_sorted % T).astype(np.int32)
    return {
        name: ShardRows(
            acts=acts[gi], layer=draws.layers[gi][draws.order].astype(np.int16), token=token, seq=seq, pos=pos
        )
        for gi, name in enumerate(plan.group_names)
    }


def row_inverse(draws: ShardDraws) -> np.ndarray:
    """inverse[k] = the row of a group's shard that kept token k lands in."""
    inverse = np.empty_like(draws.order)
    inverse[draws.order] = np.arange(draws.order.size)
    return inverse


class ShardProducer:
    """Runs the model over a shard's contexts and gathers each group's drawn rows."""

    def __init__(self, lm: LoadedModel, plan: Plan, seed: int, batch_size: int, storage_dtype: str):
        self.lm = lm
        self.plan = plan
        self.seed = seed
        self.batch_size = batch_size
        self.storage_dtype = storage_dtype
        self.torch_storage = dtype_named(storage_dtype).logical
        self.layer_index = {layer: i for i, layer in enumerate(plan.layers)}
        self.group_of = {layer: gi for gi, g in enumerate(plan.groups) for layer in g}

    def produce(self, tokens: np.ndarray, shard: int, on_batch=None) -> tuple[dict[str, ShardRows], ShardSums]:
        """Rows per group (shuffled, in storage dtype) and the per-layer statistics of this shard."""
        start, stop = self.plan.shard_contexts(shard)
        tokens_CT = np.array(tokens[start:stop])  # a private copy: the memmap is read-only
        draws = shard_draws(self.plan, self.seed, shard, tokens_CT)
        n, d, dev = draws.kept.size, self.lm.d_model, self.lm.device
        inverse = row_inverse(draws)
        outs = [torch.empty(n, d, dtype=self.torch_storage, device=dev) for _ in self.plan.groups]
        acc = LayerSumsAccumulator(len(self.plan.layers), d, dev)
        guard = ActivationGuard(self.plan.layers, dev)
        stored_rows = self.plan.stats_from == STATS_FROM_STORED
        T = tokens_CT.shape[1]
        for b0 in range(0, tokens_CT.shape[0], self.batch_size):
            b1 = min(b0 + self.batch_size, tokens_CT.shape[0])
            k0, k1 = np.searchsorted(draws.kept, [b0 * T, b1 * T])
            index = self._batch_index(draws, inverse, k0, k1, b0 * T)
            input_ids = torch.from_numpy(tokens_CT[b0:b1]).long().to(dev)

            def on_layer(layer: int, resid: torch.Tensor, index=index) -> None:
                src, dst = index[layer]
                rows = resid.reshape(-1, d).index_select(0, src).float()
                stored = rows.to(self.torch_storage)
                outs[self.group_of[layer]].index_copy_(0, dst, stored)
                guard.track(self.layer_index[layer], rows)
                acc.add(self.layer_index[layer], stored.float() if stored_rows else rows)

            capture_layers(self.lm.model, self.lm.blocks, input_ids, self.plan.layers, on_layer, self.plan.hookpoint)
            # before anything of the shard is written: inf/NaN, overflowing norms, float16's range
            guard.check(f"shard {shard}", self.storage_dtype, self.lm.dtype)
            if on_batch is not None:
                on_batch(input_ids.numel())
        acts = [to_storage(o, self.storage_dtype) for o in outs]
        return assemble_rows(self.plan, draws, tokens_CT, start, acts), acc.sums(self.plan.layers)

    def _batch_index(self, draws: ShardDraws, inverse: np.ndarray, k0: int, k1: int, offset: int):
        """Per layer: (positions in the flattened batch, destination rows), as device tensors."""
        index = {}
        ks = np.arange(k0, k1)
        for gi, group in enumerate(self.plan.groups):
            drawn = draws.layers[gi, k0:k1]
            for layer in group:
                sel = ks[drawn == layer]
                src = torch.from_numpy(draws.kept[sel] - offset).to(self.lm.device)
                dst = torch.from_numpy(inverse[sel]).to(self.lm.device)
                index[layer] = (src, dst)
        return index



def commit_shard(
    layout: RunLayout,
    store: ActivationStore,
    plan: Plan,
    shard: int,
    rows: dict[str, ShardRows],
    sums: ShardSums,
    seconds: float,
) -> ShardRecord:
    """Write a shard's rows, then its sums, then (last, atomically) its completion record."""
    tag = f"shard-{shard:05d}"
    faults.point(f"{tag}/before-write", layout.acts)
    for name, group_rows in rows.items():
        store.write_shard(name, shard, group_rows)
        faults.point(f"{tag}/after-{name}", layout.acts / name)
    save_npz_atomic(layout.shard_sums(shard), sum_x=sums.sum_x, norm_hist=sums.norm_hist, max_norm=sums.max_norm)
    faults.point(f"{tag}/before-record", layout.shard_record(shard))
    record = ShardRecord(
        shard=shard,
        config_hash=plan.config_hash,
        contexts=plan.shard_contexts(shard),
        stored_tokens=len(next(iter(rows.values()))),
        groups={
            name: GroupRows(
                rows=len(r),
                layer_counts={int(k): int(c) for k, c in zip(*np.unique(r.layer, return_counts=True))},
                checksums=r.checksums(),
                files=store.file_sizes(name, shard),  # verification compares these first (cheap)
            )
            for name, r in rows.items()
        },
        layer_stats=sums.layers,
        seconds=round(seconds, 3),
        written_at=time.time(),
    )
    save_record(layout.shard_record(shard), record)
    faults.point(f"{tag}/after-record", layout.shard_record(shard))
    return record
