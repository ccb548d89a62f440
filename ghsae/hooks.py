"""Activation capture: forward hooks on the decoder blocks (resid_post) or on modules inside them
(resid_mid, mlp_out, attn_out: ghsae.lm.hook_sites), forward stopped after the last one needed.

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

from ghsae.lm import HookSite, hook_sites

LayerCallback = Callable[[int, torch.Tensor], None]
"""Called as on_layer(layer, acts_BTD) with the layer's activation at the hookpoint, in the model's dtype."""


class _StopForward(Exception):
    """Raised from the last needed block's hook to end the forward pass early."""


def activation(site: HookSite, args: tuple, output: object) -> torch.Tensor:
    """The tensor a site's hook sees: its module's first input, or its output (a tuple's first element)."""
    value = args[0] if site.reads_input else output[0] if isinstance(output, tuple) else output
    assert isinstance(value, torch.Tensor), f"{type(site.module).__name__} gave {type(value).__name__}"
    return value


@contextmanager
def hooked_sites(sites: list[HookSite], layers: Iterable[int], on_layer: LayerCallback, stop_after: int | None = None):
    """Register hooks that pass each listed layer's activation to on_layer; stop after layer stop_after's."""
    layer_set = set(layers)
    stop_after = max(layer_set) if stop_after is None else stop_after
    handles = []

    def make_hook(layer: int):
        site = sites[layer]

        def hook(module: nn.Module, args: tuple, output: object = None) -> None:
            if layer in layer_set:
                on_layer(layer, activation(site, args, output))
            if layer == stop_after:
                raise _StopForward

        return hook

    for layer in sorted(layer_set | {stop_after}):
        site = sites[layer]
        register = site.module.register_forward_pre_hook if site.reads_input else site.module.register_forward_hook
        handles.append(register(make_hook(layer)))
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
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    layers: Iterable[int],
    on_layer: LayerCallback,
    hookpoint: str = "resid_post",
) -> None:
    """One forward pass over input_ids [B, T], calling on_layer with each listed layer's activation at
    `hookpoint` (resid_post: the block's output), then stopping."""
    with hooked_sites(hook_sites(model, blocks, hookpoint), layers, on_layer):
        forward_until(model, input_ids)
