"""The training loop for one SAE: step(), log(), checkpoint(), resumable at any checkpoint.

A checkpoint holds the SAE, the optimiser, the loader position (epoch, batches consumed) and the
RNG state, with a digest of all of them, written to a temporary name and renamed. One that fails
its digest (or cannot be read) is removed with a warning and the SAE trains from the start. The loader's order is a pure function of
(seed, epoch), so a run killed and resumed sees the same batches and, on CPU, ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ghsae import faults
from ghsae.atomic import save_torch_atomic, write_parquet_atomic
from ghsae.cache.loader import ActivationLoader, LoaderBatch
from ghsae.config import FitConfig
from ghsae.errors import GhsaeError, StoreError
from ghsae.layout import sae_checkpoint, sae_training_metrics
from ghsae.records import Provenance
from ghsae.sae import SparseAutoencoder
from ghsae.train.provenance import provenance_diffs
from ghsae.train.tracking import Tracking

LOG_EVERY = 10  # steps between metric rows
log = logging.getLogger(__name__)


class TrainingDiverged(GhsaeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeRefused(GhsaeError):
    """A checkpoint or trained SAE was made with other fit settings or another store."""


class CheckpointDamaged(Exception):
    """A checkpoint that cannot be read or fails its digest (never shown as such: fit starts over)."""


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
        provenance: Provenance | None = None,
        restart: bool = False,
        tracking: Tracking | None = None,
    ):
        self.tracking = tracking  # fit.log's trackers, fed the rows metrics.parquet gets
        self.provenance = provenance  # fit settings + store state (train/provenance.py), checked on resume
        self.restart = restart  # --overwrite: a checkpoint of other settings is deleted, not refused
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
        if self.state.tokens >= self.total_tokens or self.tracking is None:
            return self._run(progress)
        try:
            self.tracking.open(self.state.step)  # a tracker that fails to start closes those started
            return self._run(progress)
        finally:
            self.tracking.close()

    def _run(self, progress: bool) -> TrainState:
        steps_before = self.state.step
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
        if self.state.step > steps_before:  # a run with nothing left to do writes nothing
            self.checkpoint()
        return self.state

    def step(self, batch: LoaderBatch) -> dict:
        """One optimiser step. Returns its metrics as device tensors (read them only when logging)."""
        sae, opt = self.sae, self.optimizer
        sae.train()
        for group in opt.param_groups:
            group["lr"] = self.lr_at(self.state.tokens)
        faults.point(f"fit/step-{self.state.step + 1}")
        out = sae(batch.x)
        loss = out.loss.detach()
        if self.sync_each_step:
            if not torch.isfinite(loss):
                self._check_batch_finite(batch)
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

    def _check_batch_finite(self, batch: LoaderBatch) -> None:
        """A non-finite loss from non-finite stored rows is the store's fault, not the learning rate's."""
        if not torch.isfinite(batch.x).all():
            raise StoreError(
                f"{self.name}: the store holds non-finite activations (inf/NaN) in the batch of step "
                f"{self.state.step + 1}; lowering fit.lr will not help. Re-run `ghsae harvest` on the run: it "
                "rewrites shards holding them and stops with their cause and fix"
            )

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
        if self.tracking is not None:
            self.tracking.log(metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            fvu=f"{metrics['fvu']:.3f}",
            l0=f"{metrics['l0']:.0f}",
            dead=f"{metrics['dead_pct']:.1f}%",
        )

    # --- checkpoints ---------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return sae_checkpoint(self.out_dir)

    def checkpoint(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now
        payload: dict[str, Any] = {
            "provenance": self.provenance.to_json() if self.provenance is not None else None,
            "sae_cfg": self.sae.cfg.to_json(),
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": {k: v for k, v in self.state.__dict__.items() if k != "metrics"},
            "metrics": self.state.metrics,
            "rng": torch.get_rng_state(),
        }
        payload[DIGEST_KEY] = payload_digest(payload)
        save_torch_atomic(self.checkpoint_path, payload, fault="fit/checkpoint")
        if self.state.metrics:
            write_parquet_atomic(sae_training_metrics(self.out_dir), self.state.metrics)
        self._last_checkpoint_tokens = self.state.tokens

    def resume(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        payload = self._load_checkpoint()
        if payload is None:
            return False
        saved, now = payload["sae_cfg"], self.sae.cfg.to_json()
        diffs = [
            f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in ("architecture", "d_model", "n_latents", "layers", "k")
            if saved.get(k) != now.get(k)
        ]
        if self.provenance is not None:
            saved = payload.get("provenance")
            diffs += provenance_diffs(Provenance.from_json(saved) if saved else None, self.provenance, "checkpoint")
        if diffs and self.restart:
            log.warning("%s: --overwrite: starting over (the checkpoint differs: %s)", self.name, "; ".join(diffs[:4]))
            return False
        if diffs:
            raise ResumeRefused(
                f"{self.checkpoint_path} was trained differently ({'; '.join(diffs[:6])}"
                f"{'; ...' if len(diffs) > 6 else ''}); continuing it would mix the two. Pass --overwrite to "
                "start this SAE over, or restore the settings it was trained with"
            )
        self.sae.load_state_dict(payload["sae"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = TrainState(**payload["state"], metrics=payload["metrics"])
        torch.set_rng_state(payload["rng"])
        self._last_checkpoint_tokens = self.state.tokens
        return True

    def _load_checkpoint(self) -> dict | None:
        """The checkpoint, once it matches its digest; None when it is damaged: it is removed with a
        warning and the SAE trains from the start (a damaged resume would train on wrong weights)."""
        try:
            return self._read_checkpoint()
        except CheckpointDamaged as e:
            log.warning("%s: %s is damaged (%s); training this SAE from the start", self.name, self.checkpoint_path, e)
            self.checkpoint_path.unlink(missing_ok=True)
            return None

    def _read_checkpoint(self) -> dict:
        # weights_only: a checkpoint is data (tensors, numbers, strings); a run folder received from
        # someone else must not be able to run code on resume
        try:
            payload = torch.load(self.checkpoint_path, map_location=self.loader.device, weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise
            raise CheckpointDamaged(
                f"not a readable ghsae checkpoint: {type(e).__name__}: {str(e).split('.')[0][:100]}"
            ) from None
        if not isinstance(payload, dict) or "sae" not in payload:
            raise CheckpointDamaged("not a ghsae checkpoint")
        recorded = payload.pop(DIGEST_KEY, None)
        if recorded is None and set(payload) != UNDIGESTED_KEYS:
            raise CheckpointDamaged("its digest is missing")
        if recorded is None:  # written before checkpoints carried a digest
            log.warning(
                "%s: %s carries no digest (an older ghsae wrote it); resumed unchecked", self.name, self.checkpoint_path
            )
        elif recorded != payload_digest(payload):
            raise CheckpointDamaged("its contents differ from the digest written with them")
        return payload


DIGEST_KEY = "digest"  # a checkpoint's SHA-256 of everything else it holds (payload_digest)
UNDIGESTED_KEYS = {"provenance", "sae_cfg", "sae", "optimizer", "state", "metrics", "rng"}  # before the digest


def payload_digest(payload: dict) -> str:
    """SHA-256 over a checkpoint's contents as loaded (keys, numbers, strings, each tensor's dtype,
    shape and bytes), so it holds whatever device the tensors were saved from or loaded to. torch's
    zip format keeps no checksum that its loader checks: a flipped byte inside a tensor loads."""
    h = hashlib.sha256()
    _feed(payload, h)
    return h.hexdigest()


def _feed(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"tensor:{obj.dtype}:{list(obj.shape)}".encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"dict:{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(f"key:{key!r}".encode())
            _feed(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}:{len(obj)}".encode())
        for item in obj:
            _feed(item, h)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
