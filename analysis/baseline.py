"""What makes a per-layer baseline a fair comparison, checked from the two runs' records.

A baseline is refused, with its reason, unless it is per-layer SAEs of the same model, tokenizer
and layers, harvested from the same token stream with the same eval split; none of either run's
harvested contexts is one the report evaluates on (read from every shard's stored context range,
not assumed from the configs); and its SAEs trained on the same number of tokens as the run's
(within TOKENS_TOLERANCE). Unequal tokens are accepted with `--allow-unmatched`; the page then
shows the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ghsae.cache.manifest import Plan, done_shards, load_shard_record
from ghsae.errors import ConfigError
from ghsae.layout import RunLayout

TOKENS_TOLERANCE = 0.01
"""Relative difference in training tokens per SAE still counted as equal (one pass over a group's
rows differs by a few rows between groupings, as the layer draws differ)."""


@dataclass(frozen=True)
class BaselineCheck:
    """The outcome of the checks a report shows beside the comparison."""

    eval_contexts: tuple[int, int]  # [first, last + 1) of the contexts evaluated, in both token streams
    run_tokens_per_sae: float
    base_tokens_per_sae: float
    matched: bool  # tokens per SAE equal within TOKENS_TOLERANCE

    @property
    def tokens_ratio(self) -> float:
        """Baseline's training tokens per SAE over the run's."""
        return self.base_tokens_per_sae / max(self.run_tokens_per_sae, 1e-12)


def check_baseline_data(run_layout: RunLayout, run: Plan, base_layout: RunLayout, base: Plan) -> None:
    """Refuse, with every reason found, a baseline of another model, layers, token stream or eval
    split, or one whose harvest covers the evaluated contexts. Needs no SAE: run it before loading."""
    where = f"--baseline {base_layout.root}"
    problems = _identity_problems(run, base)
    if problems:
        raise ConfigError(f"{where} cannot be compared with this run: {'; '.join(problems)}")
    problems = _data_problems(run_layout, run, base_layout, base)
    if problems:
        raise ConfigError(f"{where} is not a fair comparison: {'; '.join(problems)}")


def check_baseline_tokens(
    run: Plan,
    run_tokens: dict[str, int],
    base_layout: RunLayout,
    base_tokens: dict[str, int],
    allow_unmatched: bool = False,
) -> BaselineCheck:
    """After check_baseline_data: refuse unequal training tokens per SAE unless allowed; return
    what the page reports."""
    run_t = float(np.mean(list(run_tokens.values()))) if run_tokens else 0.0
    base_t = float(np.mean(list(base_tokens.values()))) if base_tokens else 0.0
    matched = abs(base_t - run_t) <= TOKENS_TOLERANCE * max(run_t, 1.0)
    first, n_eval = run.n_contexts_harvest, int(run.data.get("n_contexts_eval", 0))
    check = BaselineCheck((first, first + n_eval), run_t, base_t, matched)
    if not matched and not allow_unmatched:
        raise ConfigError(
            f"--baseline {base_layout.root} is not a fair comparison: its SAEs trained on {base_t:,.0f} tokens "
            f"each, this run's on {run_t:,.0f} (ratio {check.tokens_ratio:.3f}); fit both with the same "
            "fit.tokens, or pass --allow-unmatched to compare anyway (the page then shows the ratio)"
        )
    return check


def _identity_problems(run: Plan, base: Plan) -> list[str]:
    problems = []
    if base.data["model"]["fingerprint"] != run.data["model"]["fingerprint"]:
        problems.append(f"its model is {base.data['model']['source']!r}, this run's is {run.data['model']['source']!r}")
    if base.data["tokenizer"]["fingerprint"] != run.data["tokenizer"]["fingerprint"]:
        problems.append("its tokenizer differs from this run's")
    if base.layers != run.layers:
        problems.append(f"it covers layers {base.layers}, this run {run.layers}")
    if any(len(g) != 1 for g in base.groups):
        sizes = sorted({len(g) for g in base.groups})
        problems.append(f"it is not per-layer (group sizes {sizes}); harvest it with --groups per-layer")
    return problems


def _data_problems(run_layout: RunLayout, run: Plan, base_layout: RunLayout, base: Plan) -> list[str]:
    """Same token stream, same eval split, and no harvested context among the evaluated ones."""
    problems = []
    if base.context_length != run.context_length:
        return [f"its contexts are {base.context_length} tokens, this run's {run.context_length}"]
    run_spec, base_spec = run.data["dataset"].get("spec"), base.data["dataset"].get("spec")
    run_arr = np.load(run_layout.tokens, mmap_mode="r")
    base_arr = np.load(base_layout.tokens, mmap_mode="r")
    # The fingerprint hashes each run's whole token array, so runs of different lengths differ there
    # even on one stream: compare the streams themselves over the contexts both hold.
    common = min(run_arr.shape[0], base_arr.shape[0])
    if run_spec != base_spec or not np.array_equal(run_arr[:common], base_arr[:common]):
        differs = "" if run_spec != base_spec else " (the same name, but other tokens)"
        problems.append(f"it was harvested from dataset {base_spec!r}{differs}, this run from {run_spec!r}")
        return problems
    first, n_eval = run.n_contexts_harvest, int(run.data.get("n_contexts_eval", 0))
    evaluated = (first, first + n_eval)
    for name, layout, plan in (("the baseline", base_layout, base), ("this run", run_layout, run)):
        seen = _harvested_ranges(layout, plan)
        overlap = [(a, b) for a, b in seen if a < evaluated[1] and b > evaluated[0]]
        if overlap:
            a, b = overlap[0]
            problems.append(
                f"{name} harvested contexts {a}-{b - 1}, which include the eval contexts "
                f"{evaluated[0]}-{evaluated[1] - 1}: its SAEs trained on the tokens the report evaluates on"
            )
    base_eval = (base.n_contexts_harvest, base.n_contexts_harvest + int(base.data.get("n_contexts_eval", 0)))
    if base_eval != evaluated:
        problems.append(
            f"its eval split is contexts {base_eval[0]}-{base_eval[1] - 1}, this run's {evaluated[0]}-{evaluated[1] - 1}; "
            "harvest the baseline with the same harvest.tokens and harvest.eval_tokens"
        )
    return problems


def _harvested_ranges(layout: RunLayout, plan: Plan) -> list[tuple[int, int]]:
    """[start, stop) of the contexts of every harvested shard, from its completion record."""
    config_hash = plan.data["config_hash"]
    return [tuple(load_shard_record(layout, s, config_hash)["contexts"]) for s in done_shards(layout, plan)]
