"""Shared fixtures: tiny random causal LMs saved as local folders, and text generated here.

Nothing is downloaded: the tokenizer is a word-level one built from the generated vocabulary,
and the models are randomly initialised from small configs of three architecture families.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

# The harvested and fitted run fixtures of runs.py (small_cfg, harvested_run, fitted_run, ...),
# available to every test without importing them.
pytest_plugins = ("runs",)


TIERS = ("unit", "integration")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, the folder under tests/ it sits in, so `-m unit` selects by folder.

    A file not yet filed under a tier counts as integration: the fast tier stays fast."""
    tests = Path(__file__).resolve().parent
    for item in items:
        folder = Path(item.path).resolve().relative_to(tests).parts[0]
        item.add_marker(folder if folder in TIERS else "integration")


def needs_module(module: str, install: str):
    """Skip a test whose optional dependency is absent, except where GHSAE_REQUIRE_OPTIONAL is set.

    scripts/test.sh (CI) installs every optional dependency and sets it, so there a missing
    package is a failure, not a silent skip.
    """
    import importlib.util
    import os

    missing = importlib.util.find_spec(module) is None
    if missing and os.environ.get("GHSAE_REQUIRE_OPTIONAL"):
        raise RuntimeError(f"{module} is required here (GHSAE_REQUIRE_OPTIONAL is set): {install}")
    return pytest.mark.skipif(missing, reason=f"needs {module}: {install}")


WORDS = [f"w{i}" for i in range(300)]
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]


def generate_documents(n_docs: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    """Random documents whose word frequencies follow a Zipf-like law, so layers see structure."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    return [" ".join(rng.choices(WORDS, weights, k=rng.randint(min_words, max_words))) for _ in range(n_docs)]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(arch: str, n_layers: int = 6, d_model: int = 32, max_positions: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    model = _build_with_torch_init(arch, d_model, n_layers, max_positions)
    return portable_init(model, seed)


def portable_init(model, seed: int):
    """Redraw the random weights from numpy's generator, which gives the same bits on every CPU.

    torch's own initialisers take other vector kernels on other CPUs (AVX2, AVX-512), so a model
    built from a seed there differs between machines in its last bits. Weights torch set to a
    constant (norm scales, biases) stay as they are, and so do rows it zeroed (the pad embedding).
    The spread is transformers' initializer_range, 0.02.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            values = param.detach()
            if bool((values == values.reshape(-1)[0]).all()):
                continue
            drawn = torch.from_numpy(rng.standard_normal(tuple(values.shape), dtype=np.float32) * np.float32(0.02))
            zero_rows = (
                (values == 0).all(dim=-1, keepdim=True)
                if values.dim() > 1
                else torch.zeros_like(values, dtype=torch.bool)
            )
            param.copy_(torch.where(zero_rows, torch.zeros_like(drawn), drawn).to(param.dtype))
    return model


def _build_with_torch_init(arch: str, d_model: int, n_layers: int, max_positions: int):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab = len(SPECIALS) + len(WORDS)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            **common,
        )
        return LlamaForCausalLM(cfg)
    if arch == "neox":
        cfg = GPTNeoXConfig(
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=max_positions,
            **common,
        )
        return GPTNeoXForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=max_positions, **common)
        return GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def save_tiny_model(folder: Path, arch: str, **kwargs) -> Path:
    model = build_model(arch, **kwargs)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(root / arch, arch) for arch in ("llama", "neox", "gpt2")}


@pytest.fixture(scope="session")
def tiny_lm(tiny_llama):
    """The tiny Llama loaded once, for tests that harvest it several times."""
    from ghsae.lm import load_model

    return load_model(str(tiny_llama), "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> Path:
    """A jsonl file of generated documents, enough for every harvest in the tests."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with open(path, "w") as fh:
        for doc in generate_documents(600):
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


def tiny_config(model: Path, dataset: Path, **overrides):
    """A small, fast pipeline config on a tiny model: 4 shards of 512 token positions."""
    from ghsae.config import config_from_dict

    raw = {
        "model": {"path": str(model), "device": "cpu"},
        "data": {"dataset": str(dataset), "context_length": 64},
        "harvest": {"tokens": 2048, "eval_tokens": 256, "probe_tokens": 512, "shard_tokens": 512, "batch_size": 4},
        "grouping": {"groups": "auto", "amad_threshold": 0.2},
        "storage": {"chunk_rows": 128},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__", 1) if "__" in dotted else dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny tensors: on a shared CPU every parallel region waits for a descheduled
    thread (measured: a 256-row TopK step 2.7 ms on one thread, 120 ms on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
