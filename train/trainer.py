"""The training loop for one SAE: step(), log(), checkpoint(), resumable at any checkpoint.

A checkpoint holds the SAE, the optimiser, the loader position (epoch, batches consumed) and the
RNG state, written to a temporary name and renamed. The loader's order is a pure function of
(seed, epoch), so a run killed and resumed sees the same batches and, on CPU, ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ghsae.cache.loader import ActivationLoader, LoaderBatch
from ghsae.config import FitConfig
from ghsae.errors import GhsaeError
from ghsae.train.io import CHECKPOINT, METRICS
from ghsae.train.sae import SparseAutoencoder

LOG_EVERY = 10  # steps between metric rows


class TrainingDiverged(GhsaeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0  # wall time spent training, summed over resumed sessions (the report's T)
    metrics: list[dict] = field(default_factory=list)


def reference_lr(n_latents: int) -> float:
    """2e-4 / sqrt(m / 2^14): the Group-SAE reference's scaling with dictionary size."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


class Trainer:
    def __init__(
        self,
        cfg: FitConfig,
        sae: SparseAutoencoder,
        loader: ActivationLoader,
        out_dir: Path,
        total_tokens: int,
        name: str = "sae",
    ):
        self.cfg = cfg
        self.sae = sae
        self.loader = loader
        self.out_dir = out_dir
        self.total_tokens = total_tokens
        self.name = name
        self.base_lr = cfg.lr or reference_lr(sae.cfg.n_latents)
        # fused: one kernel over all parameters (5x faster than the per-tensor loop on CPU); same state dict
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.base_lr, fused=True)
        # CPU reads a value at no cost, so it checks the loss and the dead set every step (exact,
        # and a NaN stops before the optimiser applies it); on CUDA a step never waits for the
        # device: both are read every LOG_EVERY steps and before every checkpoint.
        self.sync_each_step = loader.device.type != "cuda"
        sae.dead_refresh = 1 if self.sync_each_step else LOG_EVERY
        self._first_bad = torch.zeros((), dtype=torch.long, device=loader.device)
        self.state = TrainState()
        self._last_checkpoint_tokens = 0
        self._clock = time.perf_counter()

    # --- schedule ------------------------------------------------------------------------

    def lr_at(self, tokens: int) -> float:
        cfg, lr = self.cfg, self.base_lr
        if cfg.warmup_tokens and tokens < cfg.warmup_tokens:
            return lr * (tokens + 1) / cfg.warmup_tokens
        decay_start = self.total_tokens * (1 - cfg.decay_fraction)
        if cfg.decay == "none" or tokens < decay_start:
            return lr
        frac = (tokens - decay_start) / max(self.total_tokens - decay_start, 1)
        return lr * (1 - frac) if cfg.decay == "linear" else lr * 0.5 * (1 + math.cos(math.pi * frac))

    # --- the loop ------------------------------------------------------------------------

    def run(self, progress: bool = True) -> TrainState:
        self.resume()
        self._clock = time.perf_counter()
        bar = tqdm(
            total=self.total_tokens,
            initial=self.state.tokens,
            unit="tok",
            unit_scale=True,
            desc=self.name,
            disable=not progress,
        )
        t0, tokens0 = time.perf_counter(), self.state.tokens
        while self.state.tokens < self.total_tokens:
            for batch in self.loader.batches(self.state.epoch, skip=self.state.batch_in_epoch):
                metrics = self.step(batch)
                bar.update(batch.x.shape[0])
                if self.state.step % LOG_EVERY == 0 or self.state.tokens >= self.total_tokens:
                    self.raise_if_diverged()
                    metrics["tokens_per_s"] = (self.state.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                    self.log(metrics, bar)
                if self.state.tokens - self._last_checkpoint_tokens >= self.cfg.checkpoint_tokens:
                    self.raise_if_diverged()
                    self.checkpoint()
                if self.state.tokens >= self.total_tokens:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        bar.close()
        self.checkpoint()
        return self.state

    def step(self, batch: LoaderBatch) -> dict:
        """One optimiser step. Returns its metrics as device tensors (read them only when logging)."""
        sae, opt = self.sae, self.optimizer
        sae.train()
        for group in opt.param_groups:
            group["lr"] = self.lr_at(self.state.tokens)
        out = sae(batch.x)
        loss = out.loss.detach()
        if self.sync_each_step:
            if not torch.isfinite(loss):
                self._diverged(str(float(loss)), self.state.step + 1)
        else:  # remember the first bad step on the device; raise_if_diverged reads it
            bad = ~torch.isfinite(loss) & (self._first_bad == 0)
            self._first_bad = torch.where(bad, self.state.step + 1, self._first_bad)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        opt.step()
        sae.normalise_decoder()
        with torch.no_grad():
            sae.update_dead(out)
        n = batch.x.shape[0]
        self.state.step += 1
        self.state.tokens += n
        self.state.batch_in_epoch += 1
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "lr": opt.param_groups[0]["lr"],
            "loss": loss,
            "fvu": out.fvu.detach(),
            "l0": out.l0(),
            # the share of latents that did not fire in the last sae.cfg.dead_tokens training tokens
            "dead_pct": 100.0 * sae.dead_mask.float().mean(),
            **{f"loss_{k}": v.detach() for k, v in out.losses.items()},
        }

    def _diverged(self, value: str, step: int) -> None:
        raise TrainingDiverged(
            f"{self.name}: loss became {value} at step {step} "
            f"({self.state.tokens:,} tokens trained); the last good checkpoint ({self._last_checkpoint_tokens:,} tokens) "
            "is kept in its folder. Lower fit.lr or check the store's statistics"
        )

    def raise_if_diverged(self) -> None:
        """On CUDA, where steps do not check the loss themselves: stop if any step's was not finite."""
        if not self.sync_each_step and int(self._first_bad):
            self._diverged("non-finite", int(self._first_bad))

    def log(self, metrics: dict, bar) -> None:
        metrics = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        self.state.metrics.append(metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            fvu=f"{metrics['fvu']:.3f}",
            l0=f"{metrics['l0']:.0f}",
            dead=f"{metrics['dead_pct']:.1f}%",
        )

    # --- checkpoints ---------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def checkpoint(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now
        payload = {
            "sae_cfg": self.sae.cfg.to_json(),
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": {k: v for k, v in self.state.__dict__.items() if k != "metrics"},
            "metrics": self.state.metrics,
            "rng": torch.get_rng_state(),
        }
        tmp = self.out_dir / f".{CHECKPOINT}.{uuid.uuid4().hex[:8]}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint_path)
        if self.state.metrics:
            table = pa.Table.from_pylist(self.state.metrics)
            mtmp = self.out_dir / f".{METRICS}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(table, mtmp)
            os.replace(mtmp, self.out_dir / METRICS)
        self._last_checkpoint_tokens = self.state.tokens

    def resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        payload = torch.load(self.checkpoint_path, map_location=self.loader.device, weights_only=False)
        saved, now = payload["sae_cfg"], self.sae.cfg.to_json()
        diffs = [
            f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in ("architecture", "d_model", "n_latents", "layers", "k")
            if saved.get(k) != now.get(k)
        ]
        if diffs:
            raise GhsaeError(
                f"{self.checkpoint_path} does not match this SAE ({'; '.join(diffs)}); "
                "delete the folder to start over, or restore the config it was trained with"
            )
        self.sae.load_state_dict(payload["sae"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = TrainState(**payload["state"], metrics=payload["metrics"])
        torch.set_rng_state(payload["rng"])
        self._last_checkpoint_tokens = self.state.tokens
        return True
