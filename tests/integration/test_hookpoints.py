"""harvest.hookpoint: resid_post, resid_mid, mlp_out and attn_out of real tiny Llama, GPT-NeoX and GPT-2
models, each checked against hooks written here on the model's own modules (not ghsae's table of them)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from runs import assert_one_line_error, cli, write_config

from conftest import build_model, build_tokenizer, tiny_config
from ghsae.analysis.evals import _CleanBatch
from ghsae.analysis.splice import Splicer
from ghsae.config import PipelineConfig
from ghsae.errors import ModelError
from ghsae.hooks import capture_layers
from ghsae.lm import load_model
from ghsae.pipeline import fit, harvest, report
from ghsae.records import Plan
from ghsae.run import Run

SMALL = {
    "harvest.tokens": 1024,
    "grouping.groups": [[0, 2], [3, 5]],
    "fit.expansion": 2,
    "fit.k": 4,
    "fit.batch_size": 64,
    "fit.tokens": 512,
    "fit.device": "cpu",
    "report.ce_tokens": 128,
    "report.latents_shown": 2,
    "report.examples_per_latent": 2,
}


def _attn_and_mlp(block: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The attention and MLP modules of a Llama, GPT-NeoX or GPT-2 block, named as transformers names them."""
    for attn, mlp in (("self_attn", "mlp"), ("attention", "mlp"), ("attn", "mlp")):
        if hasattr(block, attn):
            return getattr(block, attn), getattr(block, mlp)
    raise AssertionError(type(block).__name__)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def independent_capture(model, blocks, ids: torch.Tensor, hookpoint: str) -> dict[int, torch.Tensor]:
    """Every layer's activation at `hookpoint`, read by hooks written here: the MLP's or the attention's
    output, or (resid_mid) the block's input plus the attention's output."""
    got: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(blocks):
        attn, mlp = _attn_and_mlp(block)

        def keep_input(m, args, kwargs, layer=layer):
            inputs[layer] = args[0] if args else kwargs["hidden_states"]

        def keep(m, a, out, layer=layer):
            value = _first(out)
            got[layer] = value + inputs[layer] if hookpoint == "resid_mid" else value

        handles.append(block.register_forward_pre_hook(keep_input, with_kwargs=True))
        module = {"mlp_out": mlp, "attn_out": attn, "resid_mid": attn}.get(hookpoint, block)
        handles.append(module.register_forward_hook(keep))
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def full_pass_with(lm, ids: torch.Tensor, layer: int, hookpoint: str, new: torch.Tensor) -> torch.Tensor:
    """Logits of a whole forward pass with layer's activation at `hookpoint` overwritten by `new`,
    written here: the module's output replaced, or (resid_mid) the block's output recomputed from new."""
    block = lm.blocks[layer]
    attn, mlp = _attn_and_mlp(block)
    if hookpoint == "resid_mid":
        norm = getattr(block, "post_attention_layernorm", None) or block.ln_2

        def overwrite(m, a, out):
            return new + mlp(norm(new))

        handle = block.register_forward_hook(overwrite)
    else:
        module = mlp if hookpoint == "mlp_out" else attn
        handle = module.register_forward_hook(lambda m, a, out: (new, *out[1:]) if isinstance(out, tuple) else new)
    try:
        with torch.inference_mode():
            return lm.model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def sequential_neox(tmp_path_factory):
    """A tiny GPT-NeoX without the parallel residual: attention, then the MLP, as in Llama."""
    folder = tmp_path_factory.mktemp("neox-sequential")
    model = build_model("neox")
    model.config.use_parallel_residual = False
    for layer in model.gpt_neox.layers:
        layer.use_parallel_residual = False
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


FAMILY_HOOKPOINTS = [
    ("llama", "mlp_out"),
    ("llama", "attn_out"),
    ("llama", "resid_mid"),
    ("gpt2", "mlp_out"),
    ("gpt2", "attn_out"),
    ("gpt2", "resid_mid"),
    ("neox", "mlp_out"),
    ("neox", "attn_out"),
    ("neox-sequential", "mlp_out"),
    ("neox-sequential", "resid_mid"),
]


def _model_path(arch, tiny_models, sequential_neox):
    return sequential_neox if arch == "neox-sequential" else tiny_models[arch]


@pytest.mark.parametrize("arch,hookpoint", FAMILY_HOOKPOINTS)
def test_capture_at_a_hookpoint_reads_what_the_models_own_modules_output(
    tiny_models, sequential_neox, arch, hookpoint
):
    lm = load_model(str(_model_path(arch, tiny_models, sequential_neox)), "cpu", "float32")
    ids = torch.randint(4, 300, (2, 16))
    expected = independent_capture(lm.model, lm.blocks, ids, hookpoint)
    got: dict[int, torch.Tensor] = {}
    capture_layers(lm.model, lm.blocks, ids, [1, 3], lambda layer, x: got.__setitem__(layer, x.clone()), hookpoint)
    assert sorted(got) == [1, 3]
    for layer in (1, 3):
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-6, atol=1e-6)
        # not the block output: the hookpoint is another activation
        assert not torch.allclose(got[layer], independent_capture(lm.model, lm.blocks, ids, "resid_post")[layer])


@pytest.mark.parametrize("arch,hookpoint", FAMILY_HOOKPOINTS)
def test_a_spliced_pass_at_a_hookpoint_equals_a_full_pass_with_that_activation_replaced(
    tiny_models, sequential_neox, arch, hookpoint
):
    lm = load_model(str(_model_path(arch, tiny_models, sequential_neox)), "cpu", "float32")
    ids = torch.randint(4, 300, (3, 16))
    splicer = Splicer(lm, hookpoint)
    acts, clean_logits = splicer.clean(ids)
    expected_acts = independent_capture(lm.model, lm.blocks, ids, hookpoint)
    for layer in (0, 2, lm.n_layers - 1):
        torch.testing.assert_close(acts[layer], expected_acts[layer], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(splicer.spliced(ids, layer, acts[layer]), clean_logits, rtol=1e-5, atol=1e-5)
        new = acts[layer] * 3.0 + 0.5
        expected = full_pass_with(lm, ids, layer, hookpoint, new)
        got = splicer.spliced(ids, layer, new)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, clean_logits, atol=1e-3), "the splice must change the output"
        # rows of the clean pass (the prefix reused) and other rows (run in full) splice alike
        torch.testing.assert_close(splicer.spliced(ids[:2], layer, new[:2]), expected[:2], rtol=1e-5, atol=1e-5)
        swapped = ids[[1, 0]]
        torch.testing.assert_close(splicer.spliced(swapped, layer, new[[1, 0]]), full_pass_with(
            lm, swapped, layer, hookpoint, new[[1, 0]]
        ), rtol=1e-5, atol=1e-5)
    assert all(type(b).__name__ != "_StandIn" for b in lm.blocks)


# --- a run at each hookpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hookpoint_runs(tmp_path_factory, tiny_llama, text_dataset, tiny_lm):
    """The tiny Llama harvested, fitted and reported at mlp_out, attn_out and resid_mid."""
    root = tmp_path_factory.mktemp("hookpoints")
    runs = {}
    for hookpoint in ("mlp_out", "attn_out", "resid_mid"):
        cfg = tiny_config(tiny_llama, text_dataset, **{**SMALL, "harvest.hookpoint": hookpoint})
        harvest(cfg, root / hookpoint, progress=False, lm=tiny_lm)
        fit(cfg, root / hookpoint, progress=False)
        report(cfg, root / hookpoint, progress=False, lm=tiny_lm)
        runs[hookpoint] = (cfg, root / hookpoint)
    return runs


HOOKPOINTS = ["mlp_out", "attn_out", "resid_mid"]


@pytest.mark.parametrize("hookpoint", HOOKPOINTS)
def test_a_run_at_a_hookpoint_is_harvested_fitted_and_reported_and_records_it(hookpoint_runs, hookpoint):
    cfg, path = hookpoint_runs[hookpoint]
    run = Run.open(path)
    assert run.plan.hookpoint == hookpoint
    assert json.loads(run.layout.plan.read_text())["hookpoint"] == hookpoint
    assert run.config.identity["harvest"]["hookpoint"] == hookpoint
    assert run.config.hash == cfg.identity_hash()
    for group in run.plan.group_names:
        assert run.sae_record(group).sae["extra"]["hookpoint"] == hookpoint
    rows = pq.read_table(path / "report" / "metrics.parquet").to_pylist()
    group_rows = [r for r in rows if r["kind"] == "group"]
    assert sorted(r["layer"] for r in group_rows) == list(range(6))
    for r in group_rows:
        assert np.isfinite(r["fvu"]) and np.isfinite(r["delta_ce"]) and r["ce_predictions"] > 0, r
    assert (path / "report" / "report.html").is_file()


@pytest.mark.parametrize("hookpoint", HOOKPOINTS)
def test_stored_activations_equal_the_module_outputs_read_by_an_independent_hook(hookpoint_runs, tiny_lm, hookpoint):
    _, path = hookpoint_runs[hookpoint]
    run = Run.open(path)
    tokens = run.tokens()
    start, stop = run.plan.shard_contexts(0)
    expected = independent_capture(tiny_lm.model, tiny_lm.blocks, torch.from_numpy(np.array(tokens[start:stop])).long(), hookpoint)
    for group in run.plan.group_names:
        rec = run.shard_record(0).groups[group]
        rows = run.store.read_shard(group, 0, rec.rows)
        want = torch.stack(
            [expected[int(lay)][int(s) - start, int(p)] for lay, s, p in zip(rows.layer, rows.seq, rows.pos)]
        )
        got = torch.from_numpy(rows.acts.astype(np.float32))
        assert set(np.unique(rows.layer).tolist()) == set(run.plan.group_layers(group))
        # float16 keeps 11 significant bits: a relative error of 2^-11 per element at most
        torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-6)


def test_splicing_the_stored_mlp_out_back_gives_the_clean_ce(hookpoint_runs, tiny_lm):
    _, path = hookpoint_runs["mlp_out"]
    run = Run.open(path)
    start, stop = run.plan.shard_contexts(0)
    ids = torch.from_numpy(np.array(run.tokens()[start:stop])).long()
    group, layer = run.plan.group_names[0], 1
    rec = run.shard_record(0).groups[group]
    rows = run.store.read_shard(group, 0, rec.rows)
    special = torch.tensor(run.plan.tokenizer.special_ids)
    keep = ~torch.isin(ids, special)
    splicer = Splicer(tiny_lm, "mlp_out")
    acts, logits = splicer.clean(ids)
    ce = _CleanBatch(splicer, ids, acts, logits, keep)
    # every kept position's stored float16 row, from a harvest where each token had one layer of the
    # group drawn: positions drawn at `layer` take the stored row, the others their clean activation
    values = acts[layer].clone()
    at = rows.layer == layer
    assert at.sum() > 100
    values[rows.seq[at] - start, rows.pos[at]] = torch.from_numpy(rows.acts[at].astype(np.float32))
    assert not torch.equal(values, acts[layer]), "float16 storage rounds"
    spliced_ce, kl = ce.spliced(layer, values[keep])
    clean_ce = ce.clean_ce_per_context()
    np.testing.assert_allclose(spliced_ce, clean_ce, rtol=1e-4)
    assert kl.max() < 1e-5
    # and a wrong activation does not: the test can fail
    wrong, _ = ce.spliced(layer, values[keep] * 50.0)
    assert np.abs(wrong - clean_ce).max() > 1e-2


# --- identity and errors -------------------------------------------------------------------------


def test_resid_post_leaves_the_identity_hash_and_the_plan_as_they_were(tiny_llama, text_dataset):
    default = tiny_config(tiny_llama, text_dataset)
    explicit = tiny_config(tiny_llama, text_dataset, **{"harvest.hookpoint": "resid_post"})
    assert "hookpoint" not in default.identity()["harvest"]
    assert explicit.identity_hash() == default.identity_hash()
    mlp = tiny_config(tiny_llama, text_dataset, **{"harvest.hookpoint": "mlp_out"})
    assert mlp.identity()["harvest"]["hookpoint"] == "mlp_out" and mlp.identity_hash() != default.identity_hash()
    assert PipelineConfig().harvest.hookpoint == "resid_post"


def test_a_plan_without_a_hookpoint_reads_as_resid_post_and_writes_none(harvested_run):
    raw = json.loads((harvested_run / "plan" / "plan.json").read_text())
    assert "hookpoint" not in raw
    plan = Plan.from_json(raw)
    assert plan.hookpoint == "resid_post" and plan.to_json() == raw


def test_an_unknown_hookpoint_is_refused_naming_the_choices(tiny_llama, text_dataset):
    from ghsae.errors import ConfigError

    with pytest.raises(ConfigError, match="harvest.hookpoint is 'mlp'; expected one of resid_post, resid_mid"):
        tiny_config(tiny_llama, text_dataset, **{"harvest.hookpoint": "mlp"})


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    """A tiny OPT: a causal LM of a family whose modules ghsae does not know."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("opt")
    cfg = OPTConfig(
        vocab_size=304,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_a_family_without_known_modules_is_refused_in_one_line_naming_it(tiny_opt, text_dataset, tmp_path):
    cfg = tiny_config(tiny_opt, text_dataset, **{"harvest.hookpoint": "mlp_out"})
    r = cli(["harvest", "--config", write_config(tmp_path, cfg), "--run-dir", tmp_path / "run", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert_one_line_error(r.output, "harvest.hookpoint mlp_out needs a model family whose modules ghsae knows")
    assert "Llama, GPT-NeoX, GPT-2" in r.output and "OPTForCausalLM is of family opt" in r.output
    assert not (tmp_path / "run" / "plan" / "plan.json").exists()


def test_resid_mid_is_refused_for_a_parallel_residual_neox(tiny_models):
    lm = load_model(str(tiny_models["neox"]), "cpu", "float32")
    assert lm.model.config.use_parallel_residual
    with pytest.raises(ModelError, match="resid_mid does not exist in GPTNeoXForCausalLM: with use_parallel_residual"):
        Splicer(lm, "resid_mid")
    with pytest.raises(ModelError, match="use resid_post, mlp_out or attn_out"):
        capture_layers(lm.model, lm.blocks, torch.ones(1, 4, dtype=torch.long), [0], lambda *a: None, "resid_mid")


@pytest.mark.parametrize("hookpoint", ["mlp_out", "resid_mid"])
def test_circuit_tasks_read_and_edit_the_hookpoint(tmp_path, hookpoint):
    from circuit_fixtures import save_task_llama

    from ghsae.analysis import tasks as T
    from ghsae.analysis.circuits import Dictionary, TaskRunner
    from ghsae.sae import SAEConfig, build_sae

    lm = load_model(str(save_task_llama(tmp_path / "llama")), "cpu", "float32")
    task = T.make_task("sva", lm.tokenizer, 8, 0)
    runner = TaskRunner(lm, task, [1], batch_prompts=4, hookpoint=hookpoint)
    # the activation and its gradient, from hooks and autograd written here
    b = runner.batches[0]
    acts: list[torch.Tensor] = []
    block = lm.blocks[1]
    attn, mlp = _attn_and_mlp(block)

    def keep(m, a, out):
        acts.append(_first(out))
        acts[-1].retain_grad()

    def keep_mid(m, args):
        acts.append(args[0])
        acts[-1].retain_grad()

    if hookpoint == "mlp_out":
        handle = mlp.register_forward_hook(keep)
    else:
        handle = block.post_attention_layernorm.register_forward_pre_hook(keep_mid)
    embed = lm.model.get_input_embeddings()
    leaf = embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    try:
        with torch.enable_grad():
            logits = lm.model(input_ids=b.ids, use_cache=False).logits[:, -1]
            task.metric(logits, b.index).sum().backward()
    finally:
        handle.remove()
        leaf.remove()
    torch.testing.assert_close(b.resid[1], acts[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad[1], acts[0].grad, rtol=1e-5, atol=1e-7)
    # keeping every latent (and the error) is the clean model: the edit is spliced at the hookpoint
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("topk", lm.d_model, 24, [1], k=6)).eval()
    curves = {c.measure: c for c in runner.curves(Dictionary("s", "group", sae, 1, lm.d_model))}
    assert curves["faithfulness"].value[-1] == pytest.approx(1.0, abs=1e-4)
    assert curves["completeness"].value[0] == pytest.approx(1.0, abs=1e-4)


def test_the_config_and_the_model_layer_name_the_same_hookpoints():
    from ghsae import config, lm

    assert config.HOOKPOINTS == lm.HOOKPOINTS


def test_a_run_derived_at_a_hookpoint_equals_a_direct_harvest_and_another_hookpoints_source_is_refused(
    tiny_llama, text_dataset, tiny_lm, tmp_path
):
    from stored_run import run_digests

    from ghsae.errors import ConfigError
    from ghsae.harvest.derive import derive_run

    attn = {"harvest.hookpoint": "attn_out", "harvest.tokens": 1024}
    harvest(tiny_config(tiny_llama, text_dataset, **attn, **{"grouping.groups": "per-layer"}), tmp_path / "src", progress=False, lm=tiny_lm)
    cfg = tiny_config(tiny_llama, text_dataset, **attn, **{"grouping.groups": [[0, 2], [3, 5]]})
    derived = derive_run(tmp_path / "src", cfg, tmp_path / "derived", progress=False)
    harvest(cfg, tmp_path / "direct", progress=False, lm=tiny_lm)
    assert derived.plan.hookpoint == "attn_out"
    got = {k: v for k, v in run_digests(derived.root).items() if k != "derived.json"}
    assert got == run_digests(tmp_path / "direct")
    mlp = tiny_config(tiny_llama, text_dataset, **{**attn, "harvest.hookpoint": "mlp_out"})
    with pytest.raises(ConfigError, match="hookpoint"):
        derive_run(tmp_path / "src", mlp, tmp_path / "other", progress=False)


def test_a_sweep_at_a_hookpoint_evaluates_every_grouping_there(tiny_llama, text_dataset, tmp_path):
    cfg = tiny_config(tiny_llama, text_dataset, **{**SMALL, "harvest.hookpoint": "mlp_out", "fit.checkpoint_tokens": 512})
    args = ["sweep", "--config", write_config(tmp_path, cfg), "--run-dir", tmp_path / "sweep", "--no-progress"]
    r = cli([*args, "--groups", "2,per-layer"])
    assert r.exit_code == 0, r.output
    for name in ("G2", "per-layer"):
        run = Run.open(tmp_path / "sweep" / name)
        assert run.plan.hookpoint == "mlp_out"
        assert {run.sae_record(g).sae["extra"]["hookpoint"] for g in run.plan.group_names} == {"mlp_out"}
    rows = pq.read_table(tmp_path / "sweep" / "report" / "metrics.parquet").to_pylist()
    assert {r["grouping"] for r in rows} == {"G2", "per-layer"} and len(rows) == 2 * 6
    assert all(np.isfinite(r["fvu"]) and np.isfinite(r["delta_ce"]) for r in rows)
