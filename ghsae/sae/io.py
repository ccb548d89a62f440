"""An SAE's folder: cfg.json (its SAERecord) + sae.safetensors (weights and normalisation buffers).

cfg.json is written first and the weights last, so the weights file marks a trained SAE. A folder
whose weights do not match its cfg.json is refused, not loaded half-way.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ghsae.atomic import save_safetensors_atomic
from ghsae.errors import GhsaeError
from ghsae.layout import SAE_CONFIG, SAE_WEIGHTS, sae_config, sae_weights
from ghsae.records import SAERecord, load_record, save_record
from ghsae.sae.architectures import build_sae
from ghsae.sae.base import SAEConfig, SparseAutoencoder


class SAELoadError(GhsaeError):
    """An SAE folder is missing, incomplete, or does not match what is asked of it."""


def save_sae(sae: SparseAutoencoder, folder: Path, record: SAERecord | None = None) -> None:
    """cfg.json first (the record, its `sae` field set from the SAE), the weights last."""
    folder.mkdir(parents=True, exist_ok=True)
    save_record(sae_config(folder), replace(record or SAERecord(sae={}), sae=sae.cfg.to_json()))
    state = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_safetensors_atomic(sae_weights(folder), state)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder written by `ghsae fit` (cfg.json + sae.safetensors), in eval mode."""
    folder = Path(path)
    cfg_path, weights = sae_config(folder), sae_weights(folder)
    if not cfg_path.is_file() or not weights.is_file():
        raise SAELoadError(f"{folder} is not an SAE folder: expected {SAE_CONFIG} and {SAE_WEIGHTS}")
    record = load_record(SAERecord, cfg_path, fix=f"delete {folder} and re-run `ghsae fit` for it")
    sae = build_sae(SAEConfig(**record.sae))
    state = load_file(str(weights))
    expected = sae.state_dict()
    if set(state) != set(expected):
        raise SAELoadError(f"{weights} holds {sorted(state)} but a {record.architecture} SAE needs {sorted(expected)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise SAELoadError(
                f"{weights}: {name} is {list(tensor.shape)} but cfg.json implies {list(expected[name].shape)}"
            )
    sae.load_state_dict(state)
    return sae.to(device).eval()
