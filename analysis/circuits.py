"""Sparse feature circuits per layer: attribution patching over SAE latents, then faithfulness and
completeness curves against the number of latents kept (Marks et al. 2024, as the Group-SAE paper
uses them).

What is measured, and how it answers the paper's reviewers:
- One layer at a time. At layer l the residual x is written as the SAE's reconstruction plus an
  error term, x = dec(z) + e (raw units; a group SAE is applied with that layer's normalisation,
  i.e. copied to every layer it serves). Only layer l is edited; every other layer runs clean.
- Attribution patching (gradient x activation): the effect of mean-ablating latent i is estimated
  as sum over positions (mean_i - z_i) * d_i . dm/dx, with d_i latent i's decoder row in raw units
  and dm/dx the gradient of the task metric at layer l on the clean run. x = dec(z) + e holds
  exactly, so the one clean backward pass gives every latent's gradient at every layer. Latents
  are ranked by |mean over prompts of the estimate|.
- Mean ablation: a latent (or the error) is replaced by its mean at the same position over the
  task's prompts of the same token length (in practice, of the same template).
- faithfulness(N) = (m(top N + error kept, rest mean-ablated) - m(all mean-ablated)) /
  (m(clean) - m(all mean-ablated)). Ablating everything, latents and error, writes dec(mean z) +
  mean e = mean x (dec is affine), so the floor does not depend on the SAE.
- faithfulness without the error term: the same with the error mean-ablated too, so the SAE has
  to carry the behaviour. With the error kept, an SAE that outputs zeros keeps all of x in its error
  term and scores 1 at every N: the zero-SAE line shows that, the random-SAE line shows what an
  untrained dictionary of the same shape gets.
- completeness(N) = the same normalised metric with the top N mean-ablated and the rest (error
  included) kept: the faithfulness of the complement; near 0 means the N latents carry the task.

Aggregates (per group, over all layers) are unweighted means over layers of the per-layer values at
the same N, and are shown beside the per-layer curves, never instead of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ghsae.analysis.splice import Splicer
from ghsae.analysis.tasks import TaskPrompts
from ghsae.hooks import activation
from ghsae.lm import LoadedModel
from ghsae.sae import SparseAutoencoder, build_sae

logger = logging.getLogger(__name__)

MEASURES = ("faithfulness", "faithfulness_no_error", "completeness")


@dataclass(frozen=True)
class CleanCheck:
    task: str
    n_prompts: int
    mean_metric: float
    accuracy: float  # share of prompts with metric > 0
    solved: bool
    adaptation: str


@dataclass(frozen=True)
class Curve:
    """One measure against N for one dictionary at one layer."""

    task: str
    sae: str  # the dictionary's name (an SAE, or "random <SAE>", "zero")
    kind: str  # group | baseline | random | zero
    layer: int
    measure: str  # one of MEASURES
    n: tuple[int, ...]
    value: tuple[float, ...]


@dataclass(frozen=True)
class TaskCircuits:
    check: CleanCheck
    curves: tuple[Curve, ...]
    seconds: float
    # per layer, m(clean) - m(layer mean-ablated): the normalisation's denominator. Where it is small
    # against m(clean) the layer barely matters to the task and its normalised values swing widely.
    gaps: tuple[tuple[int, float], ...] = ()


class Dictionary:
    """One SAE applied at one layer, in the layer's raw units: z = latents(x), x_hat = recon(z)."""

    def __init__(self, name: str, kind: str, sae: SparseAutoencoder | None, layer: int, d_model: int):
        self.name, self.kind, self.sae, self.layer = name, kind, sae, layer
        self.d_model = d_model

    @property
    def n_latents(self) -> int:
        return 1 if self.sae is None else self.sae.cfg.n_latents

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        if self.sae is None:  # the zero SAE: one latent that never fires, a decoder of zeros
            return x.new_zeros(x.shape[0], 1)
        return self.sae.encode(x, self.layer)

    def recon(self, z: torch.Tensor) -> torch.Tensor:
        if self.sae is None:
            return z.new_zeros(z.shape[0], self.d_model)
        return self.sae.decode(z, self.layer)

    def decoder_rows(self) -> torch.Tensor:
        """[m, d]: d recon(z) / d z_i in raw units (recon is affine in z, so this is exact)."""
        if self.sae is None:
            return torch.zeros(1, self.d_model)
        w = self.sae.W_dec.detach().float()
        # recon(e_i) - recon(0) = denormalise(W_dec[i] + b_dec) - denormalise(b_dec): the bias cancels
        return self.sae.denormalise(w, self.layer) - self.sae.denormalise(torch.zeros_like(w[:1]), self.layer)


def random_like(sae: SparseAutoencoder, seed: int) -> SparseAutoencoder:
    """An untrained SAE of the same architecture and shape, with the trained one's normalisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rand = build_sae(sae.cfg)
    rand.load_state_dict({k: v for k, v in sae.state_dict().items() if k.startswith("norm_")}, strict=False)
    return rand.to(sae.W_dec.device).eval()


def n_grid(m: int) -> list[int]:
    """0, then powers of 4 below m, then m: log-spaced, ending at every latent."""
    grid, n = [0], 1
    while n < m:
        grid.append(n)
        n *= 4
    return grid + [m]


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, T]
    index: torch.Tensor  # [B] prompt indices
    keep: torch.Tensor  # [B, T] positions edited (non-special)
    resid: dict[int, torch.Tensor]  # layer -> [B, T, D] clean activation at the hookpoint (resid_post: block output)
    grad: dict[int, torch.Tensor]  # layer -> [B, T, D] d(sum of metric)/d(that activation)
    metric: torch.Tensor  # [B] clean metric


def clean_with_grads(
    lm: LoadedModel, task: TaskPrompts, index: torch.Tensor, layers: list[int], special, hookpoint: str = "resid_post"
) -> _Batch:
    """One clean forward and backward: every listed layer's activation at `hookpoint` and the metric's
    gradient there.

    Block 0's input is made a leaf that requires grad (every hooked activation comes after it) and
    the activations keep their grads, so the gradient at a layer includes every path through the
    model after it.
    """
    ids = torch.tensor([task.ids[i] for i in index.tolist()], device=lm.device)
    outs: dict[int, torch.Tensor] = {}
    sites = lm.sites(hookpoint)

    def leaf(module, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    def keep(layer: int):
        def hook(module, args, output=None):
            x = activation(sites[layer], args, output)
            x.retain_grad()
            outs[layer] = x

        return hook

    handles = [lm.blocks[0].register_forward_pre_hook(leaf, with_kwargs=True)]
    for layer in layers:
        site = sites[layer]
        register = site.module.register_forward_pre_hook if site.reads_input else site.module.register_forward_hook
        handles.append(register(keep(layer)))
    try:
        with torch.enable_grad():
            logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1]
            metric = task.metric(logits, index)
            metric.sum().backward()
    finally:
        for h in handles:
            h.remove()
    keep_positions = ~torch.isin(ids, special)
    return _Batch(
        ids,
        index,
        keep_positions,
        {layer: outs[layer].detach() for layer in layers},
        {layer: outs[layer].grad.detach() for layer in layers},  # type: ignore[union-attr]
        metric.detach(),
    )


class TaskRunner:
    """A task's clean passes, kept so that every dictionary and layer reuses them."""

    def __init__(
        self, lm: LoadedModel, task: TaskPrompts, layers: list[int], batch_prompts: int = 16, hookpoint: str = "resid_post"
    ):
        self.lm, self.task, self.layers = lm, task, sorted(layers)
        special = torch.tensor(lm.special_ids or [-1], device=lm.device)
        self.splicer = Splicer(lm, hookpoint)
        self.batches = [
            clean_with_grads(lm, task, idx, self.layers, special, hookpoint) for idx in task.batches(batch_prompts)
        ]
        self.splicer.clean(self.batches[0].ids[:1])  # learns how the blocks pack their outputs
        self.n_prompts = len(task)
        self.clean_metric = float(torch.cat([b.metric for b in self.batches]).mean())
        self._floor: dict[int, float] = {}

    def check(self, min_accuracy: float) -> CleanCheck:
        """Solved: the metric is positive (the right answer preferred) on at least min_accuracy of the prompts."""
        m = torch.cat([b.metric for b in self.batches])
        acc = float((m > 0).float().mean())
        solved = acc >= min_accuracy
        return CleanCheck(self.task.task, self.n_prompts, float(m.mean()), acc, solved, self.task.adaptation)

    @torch.inference_mode()
    def position_means(self, layer: int, f: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
        """{prompt length T: [T, k]}: the mean of f(x) [n, k] at each position over the prompts of that length.

        Prompts of one length share a template, so this is the position-aligned mean that templated
        circuit tasks ablate to; a position-independent mean would overwrite, say, the first
        position's outsized residual with an average of ordinary ones.
        """
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, torch.Tensor] = {}
        for b in self.batches:
            v = f(b.resid[layer][b.keep].float())
            T, pos = b.ids.shape[1], b.keep.nonzero()[:, 1]
            s = sums.setdefault(T, v.new_zeros(T, v.shape[1]))
            c = counts.setdefault(T, v.new_zeros(T))
            s.index_add_(0, pos, v)
            c.index_add_(0, pos, torch.ones_like(pos, dtype=v.dtype))
        return {T: sums[T] / counts[T].clamp_min(1)[:, None] for T in sums}

    @staticmethod
    def expand(means: dict[int, torch.Tensor], b: _Batch) -> torch.Tensor:
        """The position means for each of batch b's edited rows: [n, k]."""
        return means[b.ids.shape[1]][b.keep.nonzero()[:, 1]]

    @torch.inference_mode()
    def metric_with(self, layer: int, make: Callable[[_Batch, torch.Tensor], list[torch.Tensor]]) -> list[float]:
        """Mean metric of several edits of `layer` at once; make(batch, x [n, D]) -> variants [n, D] each."""
        sums: list[float] | None = None
        for b in self.batches:
            x = b.resid[layer][b.keep].float()
            variants = make(b, x)
            vals = self._spliced(b, layer, variants)
            sums = vals if sums is None else [s + v for s, v in zip(sums, vals)]
        assert sums is not None
        return [s / self.n_prompts for s in sums]

    @torch.inference_mode()
    def _spliced(self, b: _Batch, layer: int, variants: list[torch.Tensor], max_rows: int = 256) -> list[float]:
        """Sum of the metric over the batch's prompts for each variant, variants stacked along the batch."""
        B = b.ids.shape[0]
        per = max(1, max_rows // B)
        out: list[float] = []
        for s in range(0, len(variants), per):
            chunk = variants[s : s + per]
            new = b.resid[layer].repeat(len(chunk), 1, 1)
            keep = b.keep.repeat(len(chunk), 1)
            new[keep] = torch.cat(chunk).to(new.dtype)
            logits = self.splicer.spliced(b.ids.repeat(len(chunk), 1), layer, new, logits_to_keep=1)[:, -1]
            m = self.task.metric(logits, b.index.repeat(len(chunk))).view(len(chunk), B)
            out += m.sum(1).tolist()
        return out

    def floor(self, layer: int) -> float:
        """m(everything mean-ablated): layer's residual replaced by its position means over the task's prompts."""
        if layer not in self._floor:
            means = self.position_means(layer, lambda x: x)
            self._floor[layer] = self.metric_with(layer, lambda b, x: [self.expand(means, b)])[0]
        return self._floor[layer]

    def normalised(self, layer: int, value: float) -> float:
        return (value - self.floor(layer)) / (self.clean_metric - self.floor(layer))

    # --- one dictionary at one layer -------------------------------------------------------

    @torch.inference_mode()
    def stats(self, d: Dictionary) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Position means of the latents ({T: [T, m]}) and of the error term ({T: [T, D]})."""
        return (
            self.position_means(d.layer, d.latents),
            self.position_means(d.layer, lambda x: x - d.recon(d.latents(x))),
        )

    @torch.inference_mode()
    def attribution(self, d: Dictionary) -> torch.Tensor:
        """Per latent, the mean over prompts of the linear estimate of m(latent mean-ablated) - m(clean): [m]."""
        z_means, _ = self.stats(d)
        device = self.batches[0].ids.device
        total = torch.zeros(d.n_latents, dtype=torch.float64, device=device)
        rows = d.decoder_rows().to(device)  # [m, D]
        for b in self.batches:
            x = b.resid[d.layer][b.keep].float()
            g = b.grad[d.layer][b.keep].float()
            z = d.latents(x)
            total += ((self.expand(z_means, b) - z) * (g @ rows.T)).sum(0).double()
        return (total / self.n_prompts).float()

    def curves(self, d: Dictionary, grid: list[int] | None = None) -> list[Curve]:
        """Faithfulness (error kept and mean-ablated) and completeness against N for d at its layer."""
        z_means, e_means = self.stats(d)
        order = self.attribution(d).abs().argsort(descending=True)
        grid = n_grid(d.n_latents) if grid is None else [n for n in grid if n <= d.n_latents]
        edits = []  # (latents kept [m] bool, error kept)
        for n in grid:
            top = torch.zeros(d.n_latents, dtype=torch.bool, device=order.device)
            top[order[:n]] = True
            edits += [(top, True), (top, False), (~top, True)]  # completeness: the top N ablated, the rest kept

        def make(b: _Batch, x: torch.Tensor) -> list[torch.Tensor]:
            z = d.latents(x)
            e = x - d.recon(z)
            z_mean, e_mean = self.expand(z_means, b), self.expand(e_means, b)
            return [d.recon(torch.where(keep, z, z_mean)) + (e if err else e_mean) for keep, err in edits]

        raw = self.metric_with(d.layer, make)
        vals = [self.normalised(d.layer, v) for v in raw]
        return [
            Curve(self.task.task, d.name, d.kind, d.layer, measure, tuple(grid), tuple(vals[i :: len(MEASURES)]))
            for i, measure in enumerate(MEASURES)
        ]


@dataclass(frozen=True)
class CircuitTarget:
    """An SAE whose circuits are measured, on each of its layers (kind: group or baseline)."""

    name: str
    kind: str
    sae: SparseAutoencoder


def run_task(
    lm: LoadedModel,
    task: TaskPrompts,
    targets: list[CircuitTarget],
    layers: list[int] | None = None,
    grid: list[int] | None = None,
    min_accuracy: float = 0.7,
    batch_prompts: int = 16,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
    hookpoint: str = "resid_post",
) -> TaskCircuits:
    """The clean check, then (if solved) every target's curves at each of its layers, plus the controls;
    the SAEs read, and the edits replace, each layer's activation at `hookpoint`."""
    t0 = time.perf_counter()
    served = sorted({x for t in targets for x in t.sae.cfg.layers})
    layers = served if layers is None else [x for x in layers if x in served]
    runner = TaskRunner(lm, task, layers, batch_prompts, hookpoint)
    check = runner.check(min_accuracy)
    log(
        f"{task.task}: clean metric {check.mean_metric:.3f}, accuracy {check.accuracy:.2f} on {check.n_prompts} prompts"
    )
    if not check.solved:
        # a warning, not an error: the rest of the report stands, and the page says the same
        logger.warning(
            "%s: the model gets %.0f%% of its %d prompts right, under report.task_min_accuracy (%.0f%%); its "
            "circuits are not measured (set report.task_min_accuracy lower to measure them anyway)",
            task.task, 100 * check.accuracy, check.n_prompts, 100 * min_accuracy,
        )  # fmt: skip
        return TaskCircuits(check, (), time.perf_counter() - t0)
    curves: list[Curve] = []
    gaps: list[tuple[int, float]] = []
    for t in targets:
        t.sae.to(lm.device).eval()
    controls = {t.name: random_like(t.sae, seed) for t in targets if t.kind == "group"}
    for layer in layers:
        curves += runner.curves(Dictionary("zero", "zero", None, layer, lm.d_model), [0, 1])
        for t in targets:
            if layer not in t.sae.cfg.layers:
                continue
            curves += runner.curves(Dictionary(t.name, t.kind, t.sae, layer, lm.d_model), grid)
            if t.name in controls:
                rand = Dictionary(f"random {t.name}", "random", controls[t.name], layer, lm.d_model)
                curves += runner.curves(rand, grid)
        gaps.append((layer, runner.clean_metric - runner.floor(layer)))
        log(f"{task.task}: layer {layer} done ({time.perf_counter() - t0:.0f} s)")
    return TaskCircuits(check, tuple(curves), time.perf_counter() - t0, tuple(gaps))


def curve_rows(results: list[TaskCircuits]) -> list[dict]:
    """One row per (task, dictionary, layer, measure, N), for a parquet table."""
    return [
        {"task": c.task, "sae": c.sae, "kind": c.kind, "layer": c.layer, "measure": c.measure, "n": n, "value": v}
        for r in results
        for c in r.curves
        for n, v in zip(c.n, c.value)
    ]
