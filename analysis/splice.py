"""Run a model cleanly once, then re-run it from any layer with that layer's output replaced.

A spliced pass at layer L only needs blocks L+1.. and the unembedding: blocks 0..L are swapped,
for the duration of the pass, for stand-ins that return a stored hidden state instead of computing
one (block L returns the replacement; the blocks before it pass their input through, which block L
then ignores). This reuses the clean prefix without knowing how a given architecture calls its
blocks: the model's own forward still builds its masks and position embeddings, so any model whose
blocks ghsae can hook can be spliced.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ghsae.lm import LoadedModel


def _residual(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _like(output: object, resid: torch.Tensor) -> object:
    """resid, packed the way this block packs its output (a tensor, or a tuple led by one)."""
    return (resid, *output[1:]) if isinstance(output, tuple) else resid


class _StandIn(nn.Module):
    """Takes a decoder block's place; attributes the model reads off its blocks still resolve."""

    def __init__(self, block: nn.Module, output_template: object, replacement: torch.Tensor | None):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: no parameters, no state_dict entry
        self._template = output_template
        self._replacement = replacement

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return _like(self._template, hidden_states if self._replacement is None else self._replacement)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class Splicer:
    """Clean passes with every block's output kept, and spliced passes that start after a layer."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._templates: dict[int, object] = {}

    @torch.inference_mode()
    def clean(self, input_ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Logits [B, T, V] and every block's output {layer: [B, T, D]} for one batch of contexts."""
        resid: dict[int, torch.Tensor] = {}
        handles = []
        for layer, block in enumerate(self.lm.blocks):

            def hook(module, args, output, layer=layer):
                resid[layer] = _residual(output)
                self._templates[layer] = (
                    tuple(None if isinstance(o, torch.Tensor) else o for o in output)
                    if isinstance(output, tuple)
                    else None
                )

            handles.append(block.register_forward_hook(hook))
        try:
            logits = self.lm.model(input_ids=input_ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return resid, logits

    @torch.inference_mode()
    def spliced(
        self, input_ids: torch.Tensor, layer: int, new_resid: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Logits when block `layer` outputs new_resid [B, T, D]; the blocks before it are not run.

        logits_to_keep > 0: only the last that many positions go through the unembedding (the
        circuit tasks read the last position only, and the unembedding is a large share of a small model).
        """
        if layer not in self._templates:
            raise RuntimeError("call clean() on a batch before splicing, so the blocks' output format is known")
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with self._stand_ins(layer, new_resid.to(self.lm.dtype)):
            return self.lm.model(input_ids=input_ids, use_cache=False, **extra).logits

    @contextmanager
    def _stand_ins(self, layer: int, replacement: torch.Tensor):
        blocks = self.lm.blocks
        originals = [blocks[i] for i in range(layer + 1)]
        try:
            for i in range(layer + 1):
                blocks[i] = _StandIn(originals[i], self._templates[i], replacement if i == layer else None)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
