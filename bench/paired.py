"""What bench/methods.py and bench/outliers.py share: every arm's SAEs evaluated in one pass over a
source run's held-out contexts, and a Markdown table of each arm's means with the paired difference
against the first arm (both FVU views, and delta CE % / KL when contexts are spliced)."""

from __future__ import annotations

import time

from ghsae.analysis.evals import EvalResult, EvalTarget, evaluate, outlier_thresholds
from ghsae.config import PipelineConfig
from ghsae.lm import load_model
from ghsae.run import Run

METRICS = (("fvu", "{:.4f}"), ("delta_ce_pct", "{:.2f}"), ("kl", "{:.4f}"))


def evaluate_arms(source: Run, cfg: PipelineConfig, targets: list[EvalTarget], ce_contexts: int) -> EvalResult:
    """Every target on the source's eval contexts, outliers by the source's thresholds (it saw every layer)."""
    lm = load_model(cfg.model.path, "cpu", "float32")
    t0 = time.perf_counter()
    result = evaluate(
        lm,
        source.eval_contexts(),
        targets,
        list(source.plan.tokenizer.special_ids),
        ce_contexts=ce_contexts,
        latents_sampled=1,
        examples_per_latent=1,
        progress=False,
        zero_ablation=False,
        outlier_threshold=outlier_thresholds(source, cfg.report.outlier_factor),
        hookpoint=source.plan.hookpoint,
    )
    layers = source.plan.layers
    print(
        f"evaluated in {time.perf_counter() - t0:.0f} s: FVU over {result.eval_contexts} contexts "
        f"({result.eval_tokens:,} tokens), CE/KL over {result.ce_tokens:,} predictions ({result.ce_contexts} contexts); "
        f"mean over layers {layers[0]}..{layers[-1]}, ± one SE over eval contexts",
        flush=True,
    )
    return result


def print_table(result: EvalResult, first_column: str, arms: dict[str, list[tuple[str, int]]], labels: dict[str, list[str]]) -> None:
    """One row per arm (its (SAE, layer) keys), after its label cells: each metric over typical and all
    tokens as mean ± SE, and against the first arm the paired difference (an arm with the first's keys
    is the same SAEs: no difference shown)."""
    metrics = [(m, spec) for m, spec in METRICS if m == "fvu" or result.ce_tokens > 0]
    n_labels = len(next(iter(labels.values()), []))
    head = [first_column, *(["partition"] if n_labels else [])] + [f"{m}{v}" for m, _ in metrics for v in ("_typical", "")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = next(iter(arms))
    for name, keys in arms.items():
        cells = [name, *labels.get(name, [])]
        for metric, spec in metrics:
            for key in (f"{metric}_typical", metric):
                mean, se = result.mean_with_se(keys, key)
                cell = f"{spec.format(mean)} ± {spec.format(se)}"
                if name != base and keys != arms[base]:
                    d, d_se = result.difference_with_se(keys, arms[base], key)
                    cell += f" (vs {base}: {d:+.4f} ± {d_se:.4f})"
                cells.append(cell)
        print("| " + " | ".join(cells) + " |")
