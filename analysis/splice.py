"""Run a model cleanly once, then re-run it from any layer with that layer's activation replaced.

A spliced pass at layer L only needs the blocks from L on and the unembedding: blocks before L are
swapped, for the duration of the pass, for stand-ins that return a stored hidden state instead of
computing one. This reuses the clean prefix without knowing how a given architecture calls its
blocks: the model's own forward still builds its masks and position embeddings, so any model whose
blocks ghsae can hook can be spliced.

At resid_post (the block's output) block L itself is a stand-in that returns the replacement (the
blocks before it pass their input through, which block L then ignores). At the other hookpoints
block L runs, with its module's activation replaced: the MLP's output (mlp_out), the attention's
output (attn_out), or the residual between them (resid_mid, by making attention add exactly the
difference between the replacement and the block's input). Its input, block L-1's clean output,
comes from a stand-in when the spliced rows are rows of the last clean pass (the evals' case);
other rows (the circuit tasks' stacked edits) run blocks 0..L-1 in full.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ghsae.hooks import activation
from ghsae.lm import LoadedModel, block_parts


def _residual(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _like(output: object, resid: torch.Tensor) -> object:
    """resid, packed the way this module packs its output (a tensor, or a tuple led by one)."""
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
    """Clean passes with every layer's activation at `hookpoint` kept, and spliced passes that
    replace one layer's."""

    def __init__(self, lm: LoadedModel, hookpoint: str = "resid_post"):
        self.lm = lm
        self.hookpoint = hookpoint
        self.sites = lm.sites(hookpoint)  # an unsupported family is refused here, before any pass
        self.parts = block_parts(lm.model, lm.blocks, hookpoint) if hookpoint != "resid_post" else []
        self._templates: dict[int, object] = {}
        self._clean_ids: torch.Tensor | None = None
        self._block_out: dict[int, torch.Tensor] = {}  # the last clean pass's block outputs (not resid_post)

    @torch.inference_mode()
    def clean(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Logits [B, T, V] and every layer's activation {layer: [B, T, D]} for one batch of contexts.

        logits_to_keep > 0: logits of the last that many positions only (a batch whose logits are not
        read skips most of the unembedding, a large share of a small model's pass)."""
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        acts: dict[int, torch.Tensor] = {}
        block_out: dict[int, torch.Tensor] = {}
        with ExitStack() as stack:
            for layer, block in enumerate(self.lm.blocks):
                stack.enter_context(_hook(block.register_forward_hook(self._block_hook(layer, block_out))))
                if self.hookpoint != "resid_post":
                    stack.enter_context(_hook(self._site_hook(layer, acts)))
            logits = self.lm.model(input_ids=input_ids, use_cache=False, **extra).logits
        if self.hookpoint == "resid_post":
            return block_out, logits
        self._clean_ids, self._block_out = input_ids, block_out
        return acts, logits

    def _block_hook(self, layer: int, block_out: dict[int, torch.Tensor]):
        def hook(module, args, output):
            block_out[layer] = _residual(output)
            self._templates[layer] = (
                tuple(None if isinstance(o, torch.Tensor) else o for o in output) if isinstance(output, tuple) else None
            )

        return hook

    def _site_hook(self, layer: int, acts: dict[int, torch.Tensor]):
        site = self.sites[layer]

        def hook(module, args, output=None):
            acts[layer] = activation(site, args, output)

        if site.reads_input:
            return site.module.register_forward_pre_hook(hook)
        return site.module.register_forward_hook(hook)

    @torch.inference_mode()
    def spliced(
        self, input_ids: torch.Tensor, layer: int, new_resid: torch.Tensor, logits_to_keep: int = 0, repeats: int = 1
    ) -> torch.Tensor:
        """Logits when layer `layer`'s activation at the hookpoint is new_resid [B, T, D].

        logits_to_keep > 0: only the last that many positions go through the unembedding (the
        circuit tasks read the last position only, and the unembedding is a large share of a small model).
        repeats > 1: new_resid [repeats * B, T, D] stacks that many edits of input_ids's rows along the
        batch, run in one pass (logits [repeats * B, ...]); the clean prefix is still reused.
        """
        if layer not in self._templates:
            raise RuntimeError("call clean() on a batch before splicing, so the blocks' output format is known")
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        new = new_resid.to(self.lm.dtype)
        ids = input_ids.repeat(repeats, 1) if repeats > 1 else input_ids
        with ExitStack() as stack:
            if self.hookpoint == "resid_post":
                stack.enter_context(self._stand_ins(layer + 1, new))
            else:
                if layer > 0 and self._rows_of_clean_pass(input_ids):
                    prev = self._block_out[layer - 1][: input_ids.shape[0]]
                    stack.enter_context(self._stand_ins(layer, prev.repeat(repeats, 1, 1) if repeats > 1 else prev))
                for handle in self._replace_in_block(layer, new):
                    stack.enter_context(_hook(handle))
            return self.lm.model(input_ids=ids, use_cache=False, **extra).logits

    def _rows_of_clean_pass(self, input_ids: torch.Tensor) -> bool:
        """input_ids are the first rows of the last clean pass: their block inputs are its block outputs
        (a row's hidden states depend on its own tokens alone: packed contexts, no padding)."""
        ids = self._clean_ids
        return ids is not None and input_ids.shape[0] <= ids.shape[0] and torch.equal(input_ids, ids[: input_ids.shape[0]])

    def _replace_in_block(self, layer: int, new: torch.Tensor) -> list:
        """Hooks that make block `layer` carry `new` at the hookpoint."""
        parts = self.parts[layer]
        if self.hookpoint in ("mlp_out", "attn_out"):
            module = parts.mlp if self.hookpoint == "mlp_out" else parts.attn
            return [module.register_forward_hook(lambda m, a, output: _like(output, new))]
        # resid_mid = block input + attention output: attention adds new minus the block's input
        block_input: list[torch.Tensor] = []

        def keep_input(module, args, kwargs):
            block_input.append(args[0] if args else kwargs["hidden_states"])

        return [
            self.lm.blocks[layer].register_forward_pre_hook(keep_input, with_kwargs=True),
            parts.attn.register_forward_hook(lambda m, a, output: _like(output, new - block_input[-1])),
        ]

    @contextmanager
    def _stand_ins(self, n: int, last: torch.Tensor):
        """Blocks 0..n-1 replaced by stand-ins; block n-1's returns `last`, the ones before pass through."""
        blocks = self.lm.blocks
        originals = [blocks[i] for i in range(n)]
        try:
            for i in range(n):
                blocks[i] = _StandIn(originals[i], self._templates[i], last if i == n - 1 else None)
            yield
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


@contextmanager
def _hook(handle):
    """A hook handle as a context: removed on leaving."""
    try:
        yield handle
    finally:
        handle.remove()
