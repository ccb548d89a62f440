"""`ghsae export`: write a run's group SAEs in another library's format.

SAELens format: one folder per *layer* (SAELens has no notion of an SAE that serves several
layers), each with `cfg.json` and `sae_weights.safetensors`. A ghsae SAE works in normalised
space, x_n = (x - mu_l) * s_l; SAELens SAEs take raw activations. The layer's normalisation is
folded into the weights so that the latents are *identical* to ghsae's and the reconstruction is
in raw units:

    ghsae:   pre = (x_n - b_dec) W_enc + b_enc         recon = (z W_dec + b_dec) / s + mu
    SAELens: pre = (x - b_dec') W_enc' + b_enc'        recon = z W_dec' + b_dec'

    b_dec' = mu + b_dec / s,  W_enc' = s W_enc,  b_enc' = b_enc,  W_dec' = W_dec / s.

Decoder rows are then of norm 1/s rather than 1; SAELens does not require unit rows for
inference (`rescale_acts_by_decoder_norm` stays false, so top-k selection is unchanged).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ghsae.atomic import json_bytes, save_safetensors_atomic, staged_folder, write_bytes_atomic
from ghsae.errors import ConfigError, StoreError
from ghsae.layout import SAELENS_CONFIG, SAELENS_WEIGHTS, saelens_folder
from ghsae.run import Run
from ghsae.sae import BatchTopKSAE, JumpReLUSAE, SparseAutoencoder

FORMATS = ("saelens",)
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6 reads it as is)


def saelens_state(sae: SparseAutoencoder, layer: int) -> tuple[str, dict[str, torch.Tensor], dict]:
    """The SAELens architecture name, state dict and architecture-specific cfg fields for one layer."""
    pos = sae.cfg.layers.index(layer)
    s = sae.norm_scale[pos].double()
    mu = sae.norm_mean[pos].double()
    w_enc, w_dec = sae.W_enc.double(), sae.W_dec.double()
    state = {
        "W_enc": (w_enc * s).float(),
        "b_enc": sae.b_enc.detach().float().clone(),
        "W_dec": (w_dec / s).float(),
        "b_dec": (mu + sae.b_dec.double() / s).float(),
    }
    arch = sae.cfg.architecture
    if arch == "topk":
        return "topk", state, {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    if arch == "relu":
        return "standard", state, {}
    # JumpReLU and BatchTopK at inference are both `pre * (pre > t)` with t > 0: SAELens's JumpReLU
    # (relu(pre) * (pre > t)) is the same function. BatchTopK has one threshold for all latents.
    if isinstance(sae, JumpReLUSAE):
        threshold = sae.log_threshold.detach().exp().float()
    elif isinstance(sae, BatchTopKSAE):
        if float(sae.threshold) <= 0:
            raise ConfigError("this batchtopk SAE has no inference threshold yet (it was never trained); fit it first")
        threshold = torch.full((sae.cfg.n_latents,), float(sae.threshold))
    else:
        raise ConfigError(f"no SAELens export for architecture {arch!r}")
    state["threshold"] = threshold.clone()
    return "jumprelu", state, {}


def write_saelens_folder(sae: SparseAutoencoder, layer: int, folder: Path, metadata: dict) -> None:
    """One SAELens folder for `layer`, written to a temporary sibling and renamed into place."""
    arch, state, extra = saelens_state(sae, layer)
    cfg = {
        "architecture": arch,
        "d_in": sae.cfg.d_model,
        "d_sae": sae.cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # folded into the weights above
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": True,
            **metadata,
            "ghsae_layer": layer,
            "ghsae_group_layers": sae.cfg.layers,
        },
    }
    with staged_folder(folder) as tmp:
        save_safetensors_atomic(tmp / SAELENS_WEIGHTS, {k: v.contiguous() for k, v in state.items()})
        write_bytes_atomic(tmp / SAELENS_CONFIG, json_bytes(cfg))


def check_destination(run: Run, out: Path) -> None:
    """Refuse an export into the run folder: its layer folders would sit among the run's own files
    (in saes/ they would count as SAE folders)."""
    root, target = run.root.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise ConfigError(
            f"the export destination {out} is inside the run folder {run.root}; "
            f"export next to it instead, e.g. `ghsae export {run.root} {root.parent / (root.name + '-saelens')}`"
        )


def export_run(run: Run, out: Path, fmt: str = "saelens", overwrite: bool = False) -> list[Path]:
    """Export every group SAE of a fitted run: one folder per layer, named `layer_XX`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; expected one of {', '.join(FORMATS)}")
    check_destination(run, out)
    plan = run.plan
    missing = [g for g in plan.group_names if not run.sae_trained(g)]
    if missing:
        raise StoreError(f"{run.root} has no trained SAE for {', '.join(missing)}; run `ghsae fit --run-dir {run.root}`")
    for name in plan.group_names:  # a damaged SAE is refused before any folder is written
        run.sae(name)
    width = len(str(max(plan.layers)))
    targets = {layer: saelens_folder(out, layer, width) for layer in plan.layers}
    clashes = [str(p) for p in targets.values() if p.exists()]
    if clashes and not overwrite:
        raise ConfigError(f"{clashes[0]} already exists ({len(clashes)} folders would be replaced); pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model_name": plan.model.source,
        "model_class_name": plan.model.class_name,
        "context_size": plan.context_length,
        "dataset_path": plan.dataset.spec,
        "ghsae_run": str(run.root),
        "ghsae_config_hash": plan.config_hash,
    }
    for name in plan.group_names:
        sae = run.sae(name)
        for layer in sae.cfg.layers:
            write_saelens_folder(sae, layer, targets[layer], {**metadata, "ghsae_group": name})
    return [targets[layer] for layer in plan.layers]
