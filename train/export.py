"""`ghsae export`: write a run's group SAEs in another library's format, one folder per layer.

Neither SAELens nor sparsify has an SAE that serves several layers, so each layer gets a folder of
its own, named as the target library names the hookpoint (SAELens `blocks.5.hook_resid_post`,
sparsify the module it hooks, `layers.5`), with a README.md model card; OUT/README.md describes
the whole export, so OUT can be uploaded to the Hub as it is.

A ghsae SAE works in normalised space, x_n = (x - mu_l) * s_l; both libraries take raw
activations. The layer's normalisation is folded into the weights, so that the latents are
*identical* to ghsae's and the reconstruction is in raw units:

    ghsae:    pre = (x_n - b_dec) W_enc + b_enc         recon = (z W_dec + b_dec) / s + mu
    exported: pre = (x - b_dec') W_enc' + b_enc'        recon = z W_dec' + b_dec'

    b_dec' = mu + b_dec / s,  W_enc' = s W_enc,  b_enc' = b_enc,  W_dec' = W_dec / s.

Decoder rows then have norm 1/s. SAEBench's loaders want unit rows, so `unit_decoder` moves the
1/s into the latents instead (z' = z / s: W_enc' = W_enc, b_enc' = b_enc / s, thresholds / s,
W_dec' = W_dec, whose rows ghsae keeps at unit norm). s is one number per layer, so every latent
is scaled alike: the same latents fire (TopK picks the same k) and the reconstruction is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ghsae.atomic import json_bytes, save_safetensors_atomic, staged_folder, write_bytes_atomic
from ghsae.errors import ConfigError, StoreError
from ghsae.layout import (
    MODEL_CARD,
    SAELENS_CONFIG,
    SAELENS_WEIGHTS,
    SPARSIFY_CONFIG,
    SPARSIFY_WEIGHTS,
    export_folder,
)
from ghsae.run import Run
from ghsae.sae import RawLayer, SparseAutoencoder
from ghsae.train.model_card import ExportedLayer, ExportFacts, eval_figures, model_card

FORMATS = ("saelens", "sparsify")
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout written here (SAELens >= 6 reads it as is)
# SAELens's loader (sae_lens.load_model) accepts HookedTransformer, HookedMamba or AutoModelForCausalLM;
# only a HookedTransformer has the `blocks.L.hook_*` names the folders and hook_name carry.
SAELENS_MODEL_CLASS = "HookedTransformer"
SAELENS_HOOKS = {
    "resid_post": "hook_resid_post",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}
# sparsify hooks a module of the model's base model by name: the blocks' list, then the module
# whose output the hookpoint is (there is none for resid_mid, a sum inside the block).
_SPARSIFY_BLOCKS = {"GPT2": "h", "OPT": "decoder.layers", "Mpt": "blocks"}  # else "layers" (Llama, GPT-NeoX, ...)
_SPARSIFY_MODULES = {
    ("Llama", "mlp_out"): "mlp",
    ("Llama", "attn_out"): "self_attn",
    ("GPTNeoX", "mlp_out"): "mlp",
    ("GPTNeoX", "attn_out"): "attention",
    ("GPT2", "mlp_out"): "mlp",
    ("GPT2", "attn_out"): "attn",
}


def hook_name(layer: int, hookpoint: str = "resid_post") -> str:
    """SAELens's (TransformerLens's) name of a hookpoint at `layer`: blocks.5.hook_resid_post."""
    if hookpoint not in SAELENS_HOOKS:
        raise ConfigError(f"hookpoint {hookpoint!r} has no SAELens hook name; expected one of {', '.join(SAELENS_HOOKS)}")
    return f"blocks.{layer}.{SAELENS_HOOKS[hookpoint]}"


def sparsify_hookpoint(layer: int, hookpoint: str, model_class: str) -> str:
    """sparsify's name of a hookpoint: the module of `model.base_model` whose output it is (layers.5)."""
    family = next((f for f in ("GPT2", "GPTNeoX", "Llama", "OPT", "Mpt") if model_class.startswith(f)), "")
    blocks = f"{_SPARSIFY_BLOCKS.get(family, 'layers')}.{layer}"
    if hookpoint == "resid_post":
        return blocks
    module = _SPARSIFY_MODULES.get((family, hookpoint))
    if module is None:
        raise ConfigError(
            f"sparsify hooks module outputs, and {hookpoint} of a {model_class} is none it can name "
            f"(it names mlp_out and attn_out of Llama, GPT-NeoX and GPT-2); export with --format saelens"
        )
    return f"{blocks}.{module}"


def run_hookpoint(run: Run) -> str:
    """The hookpoint the run harvested (runs from before hookpoints were recorded: resid_post)."""
    return str(getattr(run.plan, "hookpoint", "resid_post"))


# --- one layer's weights in raw units, as each library holds them ------------------------------------
# Each architecture says how SAELens holds it (SparseAutoencoder.saelens, in its own file) and whether
# sparsify can (sparsify_activation); nothing here names an architecture.


def raw_layer(sae: SparseAutoencoder, layer: int, unit_decoder: bool = False) -> RawLayer:
    """Fold `layer`'s normalisation into the weights (module docstring)."""
    return sae.raw_layer(layer, unit_decoder)


def saelens_state(
    sae: SparseAutoencoder, layer: int, unit_decoder: bool = False
) -> tuple[str, dict[str, torch.Tensor], dict]:
    """The SAELens architecture name, state dict and architecture-specific cfg fields for one layer."""
    raw = raw_layer(sae, layer, unit_decoder)
    held = sae.saelens(raw)
    return held.architecture, {**raw.state(), **held.state}, dict(held.cfg)


def write_saelens_folder(
    sae: SparseAutoencoder,
    layer: int,
    folder: Path,
    metadata: dict,
    *,
    hookpoint: str = "resid_post",
    unit_decoder: bool = False,
    card: str | None = None,
) -> None:
    """One SAELens folder for `layer`, written to a temporary sibling and renamed into place."""
    arch, state, extra = saelens_state(sae, layer, unit_decoder)
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
            "hook_name": hook_name(layer, hookpoint),
            "hook_head_index": None,
            "prepend_bos": True,
            "model_class_name": SAELENS_MODEL_CLASS,
            **metadata,
            "ghsae_layer": layer,
            "ghsae_group_layers": sae.cfg.layers,
            "ghsae_hookpoint": hookpoint,
            "ghsae_unit_decoder": unit_decoder,
        },
    }
    with staged_folder(folder) as tmp:
        save_safetensors_atomic(tmp / SAELENS_WEIGHTS, {k: v.contiguous() for k, v in state.items()})
        write_bytes_atomic(tmp / SAELENS_CONFIG, json_bytes(cfg))
        if card is not None:
            write_bytes_atomic(tmp / MODEL_CARD, card.encode())


# --- sparsify -----------------------------------------------------------------------------------------


def sparsify_state(sae: SparseAutoencoder, layer: int, unit_decoder: bool = False) -> dict[str, torch.Tensor]:
    """sparsify's SparseCoder tensors for one layer: it computes topk(relu(x - b_dec) W^T + b) and
    decodes z W_dec + b_dec; an architecture says whether that is its own (sparsify_activation)."""
    if sae.sparsify_activation is None:
        raise ConfigError(
            f"sparsify's SparseCoder has TopK latents only, and this run's SAEs are {sae.cfg.architecture}; "
            "export it with --format saelens"
        )
    raw = raw_layer(sae, layer, unit_decoder)
    return {"encoder.weight": raw.W_enc.T, "encoder.bias": raw.b_enc, "W_dec": raw.W_dec, "b_dec": raw.b_dec}


def write_sparsify_folder(
    sae: SparseAutoencoder, layer: int, folder: Path, *, unit_decoder: bool = False, card: str | None = None
) -> None:
    """One sparsify folder for `layer` (cfg.json with SparseCoderConfig's fields and d_in, sae.safetensors)."""
    state = sparsify_state(sae, layer, unit_decoder)
    d, m = sae.cfg.d_model, sae.cfg.n_latents
    cfg = {
        "activation": sae.sparsify_activation,
        "expansion_factor": max(1, m // d),
        "normalize_decoder": unit_decoder,  # whether the rows are unit norm (sparsify trains them so)
        "num_latents": m,  # decides the width; expansion_factor is only read when this is 0
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }  # nothing else: sparsify's loader prints every field it drops (the model card has the provenance)
    with staged_folder(folder) as tmp:
        save_safetensors_atomic(tmp / SPARSIFY_WEIGHTS, {k: v.contiguous() for k, v in state.items()})
        write_bytes_atomic(tmp / SPARSIFY_CONFIG, json_bytes(cfg))
        if card is not None:
            write_bytes_atomic(tmp / MODEL_CARD, card.encode())


# --- the command ----------------------------------------------------------------------------------------


def check_destination(run: Run, out: Path, fmt: str = "saelens") -> None:
    """Refuse an export into the run folder: its layer folders would sit among the run's own files
    (in saes/ they would count as SAE folders)."""
    root, target = run.root.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise ConfigError(
            f"the export destination {out} is inside the run folder {run.root}; "
            f"export next to it instead, e.g. `ghsae export {run.root} {root.parent / (root.name + '-' + fmt)}`"
        )


def folder_name(fmt: str, layer: int, hookpoint: str, model_class: str) -> str:
    return hook_name(layer, hookpoint) if fmt == "saelens" else sparsify_hookpoint(layer, hookpoint, model_class)


def export_run(
    run: Run, out: Path, fmt: str = "saelens", overwrite: bool = False, unit_decoder: bool = False
) -> list[Path]:
    """Export every group SAE of a fitted run: one folder per layer, named by the format's hook name."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; expected one of {', '.join(FORMATS)}")
    check_destination(run, out, fmt)
    plan, hookpoint = run.plan, run_hookpoint(run)
    missing = [g for g in plan.group_names if not run.sae_trained(g)]
    if missing:
        raise StoreError(f"{run.root} has no trained SAE for {', '.join(missing)}; run `ghsae fit --run-dir {run.root}`")
    saes = {name: run.sae(name) for name in plan.group_names}  # a damaged SAE is refused before any folder is written
    layers = [
        exported_layer(run, name, sae, layer, folder_name(fmt, layer, hookpoint, plan.model.class_name))
        for name, sae in saes.items()
        for layer in sae.cfg.layers
    ]
    if fmt == "sparsify":
        for sae in saes.values():
            sparsify_state(sae, sae.cfg.layers[0])  # an architecture sparsify cannot hold is refused up front
    check_clashes(out, [export_folder(out, e.folder) for e in layers] + [out / MODEL_CARD], overwrite)
    facts = export_facts(run, fmt, hookpoint, unit_decoder)
    evals = eval_figures(run)
    out.mkdir(parents=True, exist_ok=True)
    for e in layers:
        write_layer(saes[e.group], e, export_folder(out, e.folder), facts, evals)
    write_bytes_atomic(out / MODEL_CARD, model_card(facts, layers, evals).encode())
    return [export_folder(out, e.folder) for e in layers]


def exported_layer(run: Run, group: str, sae: SparseAutoencoder, layer: int, folder: str) -> ExportedLayer:
    cfg, tokens = sae.cfg, run.sae_record(group).tokens
    return ExportedLayer(layer, folder, group, list(cfg.layers), cfg.architecture, cfg.k, cfg.d_model, cfg.n_latents, tokens)


def check_clashes(out: Path, targets: list[Path], overwrite: bool) -> None:
    clashes = [str(p) for p in targets if p.exists()]
    if clashes and not overwrite:
        raise ConfigError(f"{clashes[0]} already exists ({len(clashes)} files or folders would be replaced); pass --overwrite")


def export_facts(run: Run, fmt: str, hookpoint: str, unit_decoder: bool) -> ExportFacts:
    plan = run.plan
    return ExportFacts(
        fmt=fmt,
        model=plan.model.source,
        model_class=plan.model.class_name,
        hookpoint=hookpoint,
        dataset=plan.dataset.spec,
        context_size=plan.context_length,
        config_hash=plan.config_hash,
        run=str(run.root),
        unit_decoder=unit_decoder,
    )


def write_layer(
    sae: SparseAutoencoder, e: ExportedLayer, folder: Path, facts: ExportFacts, evals: dict[int, dict[str, float]] | None
) -> None:
    card = model_card(facts, [e], evals)
    if facts.fmt == "sparsify":
        write_sparsify_folder(sae, e.layer, folder, unit_decoder=facts.unit_decoder, card=card)
        return
    metadata = {
        "model_name": facts.model,
        "context_size": facts.context_size,
        "dataset_path": facts.dataset,
        "ghsae_run": facts.run,
        "ghsae_config_hash": facts.config_hash,
        "ghsae_group": e.group,
        "ghsae_model_class": facts.model_class,  # the transformers class ghsae loaded
    }
    write_saelens_folder(
        sae, e.layer, folder, metadata, hookpoint=facts.hookpoint, unit_decoder=facts.unit_decoder, card=card
    )
