"""Saving and loading SAEs: RUN/saes/<group>/cfg.json + sae.safetensors, and training checkpoints.

cfg.json holds the SAEConfig (architecture, sizes, layers) plus provenance; the weights and the
per-layer normalisation buffers are in sae.safetensors. A folder whose weights do not match its
cfg.json is refused, not loaded half-way.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ghsae.cache.manifest import write_json_atomic
from ghsae.errors import GhsaeError
from ghsae.layout import SAE_WEIGHTS
from ghsae.train.sae import SAEConfig, SparseAutoencoder, build_sae

SAE_CONFIG = "cfg.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.parquet"


class SAELoadError(GhsaeError):
    """An SAE folder is missing, incomplete, or does not match what is asked of it."""


def save_sae(sae: SparseAutoencoder, folder: Path, extra: dict | None = None) -> None:
    """cfg.json first, the weights last: the weights file's presence is what marks the SAE as trained."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SAE_CONFIG, {"sae": sae.cfg.to_json(), **(extra or {})})
    tmp = folder / f".{SAE_WEIGHTS}.{uuid.uuid4().hex[:8]}.tmp"
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, folder / SAE_WEIGHTS)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder written by `ghsae fit` (cfg.json + sae.safetensors)."""
    folder = Path(path)
    cfg_path, weights = folder / SAE_CONFIG, folder / SAE_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise SAELoadError(f"{folder} is not an SAE folder: expected {SAE_CONFIG} and {SAE_WEIGHTS}")
    raw = json.loads(cfg_path.read_text())["sae"]
    sae = build_sae(SAEConfig(**raw))
    state = load_file(str(weights))
    expected = sae.state_dict()
    if set(state) != set(expected):
        raise SAELoadError(f"{weights} holds {sorted(state)} but a {raw['architecture']} SAE needs {sorted(expected)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise SAELoadError(
                f"{weights}: {name} is {list(tensor.shape)} but cfg.json implies {list(expected[name].shape)}"
            )
    sae.load_state_dict(state)
    return sae.to(device).eval()
