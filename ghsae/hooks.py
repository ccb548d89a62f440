"""Residual-stream capture: forward hooks on the decoder blocks, forward stopped after the last one needed.

We hook the blocks rather than ask for output_hidden_states: in Llama-family models the last
hidden state has the final norm applied, which is not the residual stream, and hooks let us stop
the forward pass (skipping the remaining blocks and the unembedding, the largest matmul of a
small model) by raising once the last needed block has run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

LayerCallback = Callable[[int, torch.Tensor], None]
"""Called as on_layer(layer, resid_BTD) with the block's output, in the model's dtype."""


class _StopForward(Exception):
    """Raised from the last needed block's hook to end the forward pass early."""


@contextmanager
def hooked_blocks(blocks: nn.ModuleList, layers: Iterable[int], on_layer: LayerCallback, stop_after: int | None = None):
    """Register hooks that pass each listed block's output to on_layer; stop after block stop_after."""
    layers = sorted(set(layers))
    stop_after = max(layers) if stop_after is None else stop_after
    handles = []

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            resid = output[0] if isinstance(output, tuple) else output
            assert isinstance(resid, torch.Tensor), f"block {layer} returned {type(resid).__name__}"
            if layer in layer_set:
                on_layer(layer, resid)
            if layer == stop_after:
                raise _StopForward

        return hook

    layer_set = set(layers)
    for layer in sorted(layer_set | {stop_after}):
        handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def forward_until(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Run the model on packed contexts (no padding, so no attention mask) until a hook stops it."""
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        return
    raise RuntimeError("the forward pass ran to the end: no hook stopped it (were the blocks hooked?)")


def capture_layers(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, layers: Iterable[int], on_layer: LayerCallback
) -> None:
    """One forward pass over input_ids [B, T], calling on_layer for each listed layer, then stopping."""
    with hooked_blocks(blocks, layers, on_layer):
        forward_until(model, input_ids)
