"""Circuit evals: task generators, attribution patching against exact ablation, and the identities
faithfulness and completeness must satisfy, on tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from circuit_fixtures import build_task_tokenizer, linear_lm, save_task_llama

from ghsae.analysis import tasks as T
from ghsae.analysis.circuits import CircuitTarget, Dictionary, TaskRunner, n_grid, random_like, run_task
from ghsae.config import TASKS
from ghsae.errors import ConfigError
from ghsae.lm import load_model
from ghsae.sae import SAEConfig, build_sae


@pytest.fixture(scope="module")
def tok():
    return build_task_tokenizer()


@pytest.fixture(scope="module")
def task_lm(tmp_path_factory):
    return load_model(str(save_task_llama(tmp_path_factory.mktemp("taskllama"))), "cpu", "float32")


def _sae(layers: list[int], d: int, arch: str = "topk", m: int = 24, seed: int = 1):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch, d, m, layers, k=6))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # latents that fire on most tokens, with different strengths
    sae.set_normalisation(torch.linspace(0.5, 2.0, len(layers)))
    return sae.eval()


def test_config_task_names_match_the_generators():
    assert set(TASKS) == set(T.GENERATORS)


@pytest.mark.parametrize("name", TASKS)
def test_generators_are_seeded_and_every_answer_is_one_token_after_its_prompt(tok, name):
    a, b, c = (T.make_task(name, tok, 40, seed) for seed in (3, 3, 4))
    assert a.prompts == b.prompts and a.prompts != c.prompts
    for i, prompt in enumerate(a.prompts):
        ids = list(tok(prompt)["input_ids"])
        assert ids == a.ids[i]
        if name == "greater-than":
            start = int(prompt.split("year ")[1][:4])
            for d, cand in enumerate(a.candidates):
                assert list(tok(prompt + str(d))["input_ids"]) == ids + [cand]
                assert a.signs[i][d] == (d > (start % 100) // 10) - (d < (start % 100) // 10)
            assert 1 in a.signs[i] and -1 in a.signs[i]
            continue
        good, bad = tok.decode([a.good[i]]).strip(), tok.decode([a.bad[i]]).strip()
        assert list(tok(prompt + " " + good)["input_ids"]) == ids + [a.good[i]]
        assert list(tok(prompt + " " + bad)["input_ids"]) == ids + [a.bad[i]]
        words = prompt.replace(",", " ").replace(".", " ").split()
        if name == "ioi":  # the answer is the name said once, the wrong one the name said twice
            assert words.count(good) == 1 and words.count(bad) == 2
        else:  # the verb agrees with the subject (second word), not with the attractor
            plural_subject = words[1].endswith("s")
            assert (good in ("are", "were", "have")) == plural_subject
            attractor = words[words.index("the") + 1]
            assert attractor.endswith("s") != plural_subject
    # batches group prompts of one token length, so no padding is needed
    for idx in a.batches(7):
        assert len({len(a.ids[i]) for i in idx.tolist()}) == 1


def test_a_tokenizer_without_one_token_names_is_refused_with_the_reason():
    from conftest import build_tokenizer

    with pytest.raises(ConfigError, match="one-token names"):
        T.make_task("ioi", build_tokenizer(), 4, 0)
    with pytest.raises(ConfigError, match="unknown|expected some of"):
        T.parse_tasks("ioi,docstring")


def test_attribution_equals_exact_ablation_where_the_model_is_linear_in_the_latent():
    lm = linear_lm()
    task = T.make_task("ioi", lm.tokenizer, 12, 0)
    runner = TaskRunner(lm, task, [0, 1, 2], batch_prompts=5)
    sae = _sae([0, 1, 2], lm.d_model)
    d = Dictionary("s", "group", sae, 1, lm.d_model)
    est = runner.attribution(d)
    z_means, _ = runner.stats(d)
    fired = [i for i in range(d.n_latents) if any(float(v[:, i].max()) > 0 for v in z_means.values())][:6]
    assert len(fired) >= 3
    for i in fired:
        keep = torch.ones(d.n_latents, dtype=torch.bool)
        keep[i] = False

        def ablate_one(b, x, keep=keep):
            z = d.latents(x)
            return [d.recon(torch.where(keep, z, runner.expand(z_means, b))) + (x - d.recon(z))]

        exact = runner.metric_with(1, ablate_one)[0] - runner.clean_metric
        assert abs(exact) > 1e-4
        assert est[i].item() == pytest.approx(exact, rel=1e-3, abs=1e-5)


def test_attribution_only_estimates_the_effect_where_the_model_is_not_linear(task_lm):
    """The control for the test above: on a Llama (norms, softmax attention) the estimate is not exact."""
    task = T.make_task("ioi", task_lm.tokenizer, 8, 0)
    runner = TaskRunner(task_lm, task, [1], batch_prompts=8)
    d = Dictionary("s", "group", _sae([1], task_lm.d_model), 1, task_lm.d_model)
    est = runner.attribution(d)
    z_means, _ = runner.stats(d)
    keep = torch.ones(d.n_latents, dtype=torch.bool)
    i = int(est.abs().argmax())
    keep[i] = False

    def ablate(b, x):
        z = d.latents(x)
        return [d.recon(torch.where(keep, z, runner.expand(z_means, b))) + (x - d.recon(z))]

    exact = runner.metric_with(1, ablate)[0] - runner.clean_metric
    assert est[i].item() != pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_faithfulness_of_everything_is_one_of_nothing_is_the_mean_ablation_and_completeness_mirrors_it(task_lm, arch):
    task = T.make_task("sva", task_lm.tokenizer, 10, 0)
    runner = TaskRunner(task_lm, task, [0, 2], batch_prompts=4)
    sae = _sae([0, 2], task_lm.d_model, arch)
    assert abs(runner.clean_metric - runner.floor(2)) > 1e-3  # the normalisation is well defined
    for layer in (0, 2):
        m = sae.cfg.n_latents
        curves = {c.measure: c for c in runner.curves(Dictionary("s", "group", sae, layer, task_lm.d_model))}
        f, f_no_err, comp = curves["faithfulness"], curves["faithfulness_no_error"], curves["completeness"]
        assert f.n == tuple(n_grid(m)) and f.n[0] == 0 and f.n[-1] == m
        assert f.value[-1] == pytest.approx(1.0, abs=1e-4)  # keep everything: the clean model
        assert f_no_err.value[0] == pytest.approx(0.0, abs=1e-4)  # ablate everything: the mean-ablated layer
        assert comp.value[0] == pytest.approx(1.0, abs=1e-4)  # nothing ablated
        assert comp.value[-1] == pytest.approx(f.value[0], abs=1e-5)  # every latent ablated, error kept
        assert f_no_err.value[-1] != pytest.approx(1.0, abs=1e-3)  # a random SAE does not carry the task


def test_the_zero_sae_is_perfect_with_its_error_kept_and_null_without(task_lm):
    task = T.make_task("ioi", task_lm.tokenizer, 8, 1)
    runner = TaskRunner(task_lm, task, [1], batch_prompts=8)
    curves = {c.measure: c for c in runner.curves(Dictionary("zero", "zero", None, 1, task_lm.d_model), [0, 1])}
    assert curves["faithfulness"].value == pytest.approx((1.0, 1.0), abs=1e-4)
    assert curves["faithfulness_no_error"].value == pytest.approx((0.0, 0.0), abs=1e-4)
    assert curves["completeness"].value == pytest.approx((1.0, 1.0), abs=1e-4)


def test_random_control_keeps_shape_and_normalisation_but_not_weights():
    sae = _sae([0, 1], 16)
    rand = random_like(sae, 7)
    assert rand.cfg == sae.cfg and torch.equal(rand.norm_scale, sae.norm_scale)
    assert not torch.equal(rand.W_dec, sae.W_dec)
    assert torch.equal(random_like(sae, 7).W_dec, rand.W_dec)


def _relabelled(task, runner, agree: bool):
    """The task with each prompt's answers ordered as the model prefers them (agree) or the reverse."""
    metric = torch.cat([b.metric for b in runner.batches])
    order = torch.cat([b.index for b in runner.batches])
    good, bad = list(task.good), list(task.bad)
    for i, m in zip(order.tolist(), metric.tolist()):
        if (m < 0) == agree:
            good[i], bad[i] = bad[i], good[i]
    return dataclasses.replace(task, good=good, bad=bad)


def test_a_task_the_model_does_not_solve_is_refused_and_one_it_solves_is_measured(task_lm):
    task = T.make_task("ioi", task_lm.tokenizer, 8, 2)
    runner = TaskRunner(task_lm, task, [1], batch_prompts=8)
    target = [CircuitTarget("group_00", "group", _sae([1], task_lm.d_model, m=8))]
    solved = run_task(task_lm, _relabelled(task, runner, True), target, grid=[0, 8])
    refused = run_task(task_lm, _relabelled(task, runner, False), target, grid=[0, 8])
    assert solved.check.accuracy == 1.0 and solved.check.solved
    assert refused.check.accuracy == 0.0 and not refused.check.solved and refused.curves == ()
    assert [layer for layer, _ in solved.gaps] == [1] and refused.gaps == ()
    kinds = {(c.kind, c.measure) for c in solved.curves}
    assert {k for k, _ in kinds} == {"group", "random", "zero"} and len(kinds) == 9
