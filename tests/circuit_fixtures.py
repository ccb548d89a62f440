"""Tiny models whose tokenizer can express the circuit tasks, and a model that is linear in its
residual stream (so attribution patching is exact on it)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from conftest import SPECIALS, WORDS
from ghsae.analysis import tasks as T
from ghsae.lm import LoadedModel, ModelSource


def task_vocabulary() -> list[str]:
    text = " ".join(
        [*T.IOI_TEMPLATES, *T.SVA_TEMPLATES, T.YEAR_TEMPLATE, *T.NAMES, *T.YEAR_NOUNS]
        + [w for pair in T.NOUNS for w in pair]
        + [v.strip() for pair in T.VERBS for v in pair]
    )
    words = sorted(set(re.findall(r"\w+|[^\w\s]", re.sub(r"\{[^}]*\}", " ", text))) - set(WORDS))
    words = [w for w in words if not w.isdigit()]
    return SPECIALS + WORDS + words + [str(d) for d in range(10)]


def build_task_tokenizer():
    """Word level, digits one by one (like SmolLM2's), every task word in the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(task_vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def save_task_llama(folder: Path, n_layers: int = 4, d_model: int = 32, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_task_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class _LinearBlock(nn.Module):
    """h + h A + (causal running mean of h) B: linear, and positions interact."""

    def __init__(self, d: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d, d) * 0.2)
        self.B = nn.Parameter(torch.randn(d, d) * 0.2)

    def forward(self, h, *args, **kwargs):
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        return h + h @ self.A + (h.cumsum(1) / steps) @ self.B


class LinearLM(nn.Module):
    """Embedding, linear blocks, linear unembedding (no norm): the logits are linear in every residual."""

    def __init__(self, vocab: int, d: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_LinearBlock(d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        h = self.embed(input_ids)
        for block in self.layers:  # looked up at call time, so the splicer's stand-ins take part
            h = block(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.head(h))

    def get_output_embeddings(self):
        return self.head


def linear_lm(n_layers: int = 3, d: int = 16, seed: int = 0) -> LoadedModel:
    tok = build_task_tokenizer()
    torch.manual_seed(seed)
    model = LinearLM(len(tok), d, n_layers).eval().requires_grad_(False)
    return LoadedModel(
        model, tok, model.layers, n_layers, d, 128, ModelSource("linear", None, "linear toy"), "linear", torch.device("cpu"), torch.float32
    )
