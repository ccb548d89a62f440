"""An SAE's folder: cfg.json (its SAERecord) + sae.safetensors (weights and normalisation buffers).

cfg.json is written first and the weights last, so the weights file marks a trained SAE. cfg.json
records the weights file's size and SHA-256: a flipped byte in the weights changes no shape and
would load as other weights, so every load compares the file with that record first. A folder
whose weights do not match its cfg.json is refused, not loaded half-way. A folder written before
the checksum existed (none in cfg.json) loads unchecked.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ghsae.atomic import write_bytes_atomic
from ghsae.errors import GhsaeError
from ghsae.hub import cached_snapshot, parse_hub_id
from ghsae.layout import SAE_CONFIG, SAE_WEIGHTS, RunLayout, sae_config, sae_weights
from ghsae.records import SAERecord, WeightsDigest, load_record, save_record
from ghsae.sae.architectures import build_sae
from ghsae.sae.base import SAEConfig, SparseAutoencoder


class SAELoadError(GhsaeError):
    """An SAE folder is missing, incomplete, damaged, or does not match what is asked of it."""


def save_sae(sae: SparseAutoencoder, folder: Path, record: SAERecord | None = None) -> None:
    """cfg.json first (the record, its `sae` field set from the SAE, the weights' checksum), the weights last."""
    folder.mkdir(parents=True, exist_ok=True)
    data = save({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()})
    record = replace(record or SAERecord(sae={}), sae=sae.cfg.to_json(), weights=WeightsDigest.of(data))
    save_record(sae_config(folder), record)
    write_bytes_atomic(sae_weights(folder), data)


def refit_hint(folder: Path) -> str:
    """How to get a damaged SAE folder back: the fit command of its run, when it sits in one."""
    run = RunLayout(folder.parent.parent)
    if run.marker.is_file() and run.sae_dir(folder.name) == folder:
        return f"train it again with `ghsae fit --run-dir {run.root} --group {folder.name}`"
    return "restore the folder from a copy, or train it again with `ghsae fit`"


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder written by `ghsae fit` (cfg.json + sae.safetensors), in eval mode, or one
    the local Hugging Face cache holds under a Hub id (`org/name/group_00`, `org/name@revision`);
    the commit it resolved to is kept in `sae.cfg.extra["hub"]`.

    Weights that differ from the checksum in cfg.json are refused (SAELoadError, naming the file)."""
    folder = Path(path).expanduser()
    hub = parse_hub_id(str(path)) if isinstance(path, str) and not folder.exists() else None
    if hub is None:
        return read_sae(folder, device, fix=refit_hint(folder))
    snapshot = cached_snapshot(hub, "model", "SAE", SAELoadError)
    sae = read_sae(snapshot.folder, device, fix=f"fetch it again with `hf download --force-download {hub.repo_id}`")
    sae.cfg.extra["hub"] = {"id": str(path), "revision": snapshot.revision}
    return sae


def read_sae(folder: Path, device: str | torch.device = "cpu", *, fix: str) -> SparseAutoencoder:
    """load_sae with the fix its errors end with (`fit`, which retrains a damaged SAE, says so)."""
    cfg_path, weights = sae_config(folder), sae_weights(folder)
    if not cfg_path.is_file() or not weights.is_file():
        raise SAELoadError(f"{folder} is not an SAE folder: expected {SAE_CONFIG} and {SAE_WEIGHTS}")
    record = load_record(SAERecord, cfg_path, fix=fix)
    try:
        sae = build_sae(SAEConfig(**record.sae))
    except (TypeError, ValueError) as e:
        raise SAELoadError(f"{cfg_path} is damaged: its sae field is not an SAE config ({e}); {fix}") from None
    state = _read_weights(weights, record.weights, fix)
    expected = sae.state_dict()
    if set(state) != set(expected):
        raise SAELoadError(
            f"{weights} holds {sorted(state)} but a {record.architecture} SAE needs {sorted(expected)}; {fix}"
        )
    for name, tensor in sorted(state.items()):  # the same first mismatch named on every run
        if tensor.shape != expected[name].shape:
            raise SAELoadError(
                f"{weights}: {name} is {list(tensor.shape)} but cfg.json implies {list(expected[name].shape)}; {fix}"
            )
    sae.load_state_dict(state)
    return sae.to(device).eval()


def _read_weights(path: Path, recorded: WeightsDigest | None, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, after checking it against the checksum its cfg.json records."""
    data = path.read_bytes()
    if recorded is not None:
        found = WeightsDigest.of(data)
        if found != recorded:
            raise SAELoadError(
                f"{path} is damaged: {found.size:,} bytes with SHA-256 {found.sha256[:16]}..., but {SAE_CONFIG} "
                f"records {recorded.size:,} bytes with SHA-256 {recorded.sha256[:16]}...; {fix}"
            )
    try:
        return load(data)
    except SafetensorError as e:
        what = "empty" if not data else f"not a safetensors file ({str(e).splitlines()[0][:120]})"
        raise SAELoadError(f"{path} is damaged: {what}; {fix}") from None
