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
from ghsae.cache.store import ActivationStore, ShardRows, to_storage
from ghsae.errors import HarvestError
from ghsae.hooks import capture_layers
from ghsae.layout import RunLayout
from ghsae.lm import LoadedModel
from ghsae.records import GroupRows, LayerSums, Plan, ShardRecord, save_record

FLOAT16_MAX = 65504.0


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


@dataclass
class _LayerStatsAcc:
    sum_x: torch.Tensor  # [L, d] float64
    sum_norm: torch.Tensor  # [L] float64
    sum_sq: torch.Tensor  # [L] float64
    count: torch.Tensor  # [L] int64
    max_abs: torch.Tensor  # [] float32, checked once per batch (one device sync, not one per layer)


class ShardProducer:
    """Runs the model over a shard's contexts and gathers each group's drawn rows."""

    def __init__(self, lm: LoadedModel, plan: Plan, seed: int, batch_size: int, storage_dtype: str):
        self.lm = lm
        self.plan = plan
        self.seed = seed
        self.batch_size = batch_size
        self.storage_dtype = storage_dtype
        self.torch_storage = torch.float16 if storage_dtype == "float16" else torch.bfloat16
        self.layer_index = {layer: i for i, layer in enumerate(plan.layers)}
        self.group_of = {layer: gi for gi, g in enumerate(plan.groups) for layer in g}

    def produce(self, tokens: np.ndarray, shard: int, on_batch=None) -> tuple[dict[str, ShardRows], ShardSums]:
        """Rows per group (shuffled, in storage dtype) and the per-layer statistics of this shard."""
        start, stop = self.plan.shard_contexts(shard)
        tokens_CT = np.array(tokens[start:stop])  # a private copy: the memmap is read-only
        draws = shard_draws(self.plan, self.seed, shard, tokens_CT)
        n, d, dev = draws.kept.size, self.lm.d_model, self.lm.device
        inverse = np.empty_like(draws.order)
        inverse[draws.order] = np.arange(n)  # kept token k lands in row inverse[k]
        outs = [torch.empty(n, d, dtype=self.torch_storage, device=dev) for _ in self.plan.groups]
        acc = self._new_acc()
        T = tokens_CT.shape[1]
        for b0 in range(0, tokens_CT.shape[0], self.batch_size):
            b1 = min(b0 + self.batch_size, tokens_CT.shape[0])
            k0, k1 = np.searchsorted(draws.kept, [b0 * T, b1 * T])
            index = self._batch_index(draws, inverse, k0, k1, b0 * T)
            input_ids = torch.from_numpy(tokens_CT[b0:b1]).long().to(dev)

            def on_layer(layer: int, resid: torch.Tensor, index=index) -> None:
                src, dst = index[layer]
                rows = resid.reshape(-1, d).index_select(0, src).float()
                outs[self.group_of[layer]].index_copy_(0, dst, rows.to(self.torch_storage))
                self._accumulate(acc, self.layer_index[layer], rows)

            capture_layers(self.lm.model, self.lm.blocks, input_ids, self.plan.layers, on_layer)
            self._check_overflow(acc, shard)
            if on_batch is not None:
                on_batch(input_ids.numel())
        return self._assemble(outs, draws, tokens_CT, start), self._sums(acc)

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

    def _new_acc(self) -> _LayerStatsAcc:
        L, d, dev = len(self.plan.layers), self.lm.d_model, self.lm.device
        f64 = torch.float64
        return _LayerStatsAcc(
            sum_x=torch.zeros(L, d, dtype=f64, device=dev),
            sum_norm=torch.zeros(L, dtype=f64, device=dev),
            sum_sq=torch.zeros(L, dtype=f64, device=dev),
            count=torch.zeros(L, dtype=torch.int64, device=dev),
            max_abs=torch.zeros((), dtype=torch.float32, device=dev),
        )

    @staticmethod
    def _accumulate(acc: _LayerStatsAcc, i: int, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        norms = rows.norm(dim=1).double()
        acc.sum_x[i] += rows.sum(dim=0, dtype=torch.float64)
        acc.sum_norm[i] += norms.sum()
        acc.sum_sq[i] += (norms * norms).sum()
        acc.count[i] += rows.shape[0]
        torch.maximum(acc.max_abs, rows.abs().amax(), out=acc.max_abs)

    def _check_overflow(self, acc: _LayerStatsAcc, shard: int) -> None:
        if self.storage_dtype == "float16":
            peak = float(acc.max_abs)
            if not np.isfinite(peak) or peak > FLOAT16_MAX:
                raise HarvestError(
                    f"shard {shard}: an activation of magnitude {peak:.4g} does not fit float16 (max {FLOAT16_MAX:g}); "
                    'set storage.dtype = "bfloat16" in pipeline.toml (same range as float32) and re-run with --overwrite'
                )

    def _assemble(self, outs, draws: ShardDraws, tokens_CT: np.ndarray, start: int) -> dict[str, ShardRows]:
        T = tokens_CT.shape[1]
        kept_sorted = draws.kept[draws.order]
        token = tokens_CT.reshape(-1)[kept_sorted].astype(np.int32)
        seq = (start + kept_sorted // T).astype(np.int32)
        pos = (kept_sorted % T).astype(np.int32)
        rows = {}
        for gi, name in enumerate(self.plan.group_names):
            rows[name] = ShardRows(
                acts=to_storage(outs[gi], self.storage_dtype),
                layer=draws.layers[gi][draws.order].astype(np.int16),
                token=token,
                seq=seq,
                pos=pos,
            )
        return rows

    def _sums(self, acc: _LayerStatsAcc) -> ShardSums:
        return ShardSums(
            sum_x=acc.sum_x.cpu().numpy(),
            layers={
                layer: LayerSums(int(acc.count[i]), float(acc.sum_norm[i]), float(acc.sum_sq[i]))
                for i, layer in enumerate(self.plan.layers)
            },
        )


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
    save_npz_atomic(layout.shard_sums(shard), sum_x=sums.sum_x)
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
