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
from pathlib import Path

import numpy as np

from ghsae.errors import ConfigError
from ghsae.records import Plan
from ghsae.run import Run

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


def check_baseline_data(run: Run, base: Run) -> None:
    """Refuse, with every reason found, a baseline of another model, layers, token stream or eval
    split, or one whose harvest covers the evaluated contexts. Needs no SAE: run it before loading."""
    where = f"--baseline {base.root}"
    check_not_itself(run.root, base.root)
    problems = _identity_problems(run.plan, base.plan)
    if problems:
        raise ConfigError(f"{where} cannot be compared with this run: {'; '.join(problems)}")
    problems = _data_problems(run, base)
    if problems:
        raise ConfigError(f"{where} is not a fair comparison: {'; '.join(problems)}")


def check_not_itself(run_dir: Path, baseline: Path) -> None:
    """Refuse a baseline that is the run itself (the same folder, however named: a symlink, a
    relative path, a bind mount): every difference would be 0.000 ± 0.000 by construction."""
    try:
        same = Path(baseline).samefile(run_dir)
    except OSError:  # a path that does not exist is refused where it is opened
        same = False
    if same:
        raise ConfigError(
            f"--baseline {baseline} is this run's own folder ({Path(run_dir).resolve()}): a run compared with "
            "itself differs by 0 everywhere; pass a per-layer run of the same model (harvest --groups per-layer), "
            "or leave --baseline out"
        )


def check_baseline_tokens(
    run: Run,
    run_tokens: dict[str, int],
    base: Run,
    base_tokens: dict[str, int],
    allow_unmatched: bool = False,
) -> BaselineCheck:
    """After check_baseline_data: refuse unequal training tokens per SAE unless allowed; return
    what the page reports."""
    run_t = float(np.mean(list(run_tokens.values()))) if run_tokens else 0.0
    base_t = float(np.mean(list(base_tokens.values()))) if base_tokens else 0.0
    matched = abs(base_t - run_t) <= TOKENS_TOLERANCE * max(run_t, 1.0)
    check = BaselineCheck(run.plan.eval_contexts, run_t, base_t, matched)
    if not matched and not allow_unmatched:
        raise ConfigError(
            f"--baseline {base.root} is not a fair comparison: its SAEs trained on {base_t:,.0f} tokens "
            f"each, this run's on {run_t:,.0f} (ratio {check.tokens_ratio:.3f}); fit both with the same "
            "fit.tokens, or pass --allow-unmatched to compare anyway (the page then shows the ratio)"
        )
    return check


def _identity_problems(run: Plan, base: Plan) -> list[str]:
    problems = []
    if base.model.fingerprint != run.model.fingerprint:
        problems.append(f"its model is {base.model.source!r}, this run's is {run.model.source!r}")
    if base.tokenizer.fingerprint != run.tokenizer.fingerprint:
        problems.append("its tokenizer differs from this run's")
    if base.hookpoint != run.hookpoint:
        problems.append(f"its SAEs read {base.hookpoint}, this run's {run.hookpoint} (harvest.hookpoint)")
    if base.layers != run.layers:
        problems.append(f"it covers layers {list(base.layers)}, this run {list(run.layers)}")
    if not base.per_layer:
        sizes = sorted({len(g) for g in base.groups})
        problems.append(f"it is not per-layer (group sizes {sizes}); harvest it with --groups per-layer")
    return problems


def _data_problems(run: Run, base: Run) -> list[str]:
    """Same token stream, same eval split, and no harvested context among the evaluated ones."""
    problems = []
    if base.plan.context_length != run.plan.context_length:
        return [f"its contexts are {base.plan.context_length} tokens, this run's {run.plan.context_length}"]
    run_spec, base_spec = run.plan.dataset.spec, base.plan.dataset.spec
    run_arr, base_arr = run.tokens(), base.tokens()
    # The fingerprint hashes each run's whole token array, so runs of different lengths differ there
    # even on one stream: compare the streams themselves over the contexts both hold.
    common = min(run_arr.shape[0], base_arr.shape[0])
    if run_spec != base_spec or not np.array_equal(run_arr[:common], base_arr[:common]):
        differs = "" if run_spec != base_spec else " (the same name, but other tokens)"
        problems.append(f"it was harvested from dataset {base_spec!r}{differs}, this run from {run_spec!r}")
        return problems
    evaluated = run.plan.eval_contexts
    for name, side in (("the baseline", base), ("this run", run)):
        overlap = [(a, b) for a, b in side.harvested_ranges() if a < evaluated[1] and b > evaluated[0]]
        if overlap:
            a, b = overlap[0]
            problems.append(
                f"{name} harvested contexts {a}-{b - 1}, which include the eval contexts "
                f"{evaluated[0]}-{evaluated[1] - 1}: its SAEs trained on the tokens the report evaluates on"
            )
    base_eval = base.plan.eval_contexts
    if base_eval != evaluated:
        problems.append(
            f"its eval split is contexts {base_eval[0]}-{base_eval[1] - 1}, this run's {evaluated[0]}-{evaluated[1] - 1}; "
            "harvest the baseline with the same harvest.tokens and harvest.eval_tokens"
        )
    return problems
