"""Inputs that used to pass silently or fail late: a model that is not a causal LM, a binary .txt, a
tokenizer without BOS/EOS, a document on one huge line, negative ids, bad seeds and group counts."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runs import assert_one_line_error, cli, write_config

from conftest import WORDS, build_tokenizer, tiny_config
from ghsae.harvest import text as text_mod
from ghsae.harvest.text import MAX_PIECE_CHARS, Document, iter_documents, iter_token_documents, pack_contexts


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, text_dataset):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=304)
    ).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    config = write_config(tmp_path, tiny_config(folder, text_dataset))
    r = cli(["harvest", "--config", config, "--run-dir", tmp_path / "run", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "holds a BertModel (config.json architectures), not a causal LM")
    assert not (tmp_path / "run").exists()


def test_a_binary_file_named_txt_is_warned_about(tmp_path, caplog):
    path = tmp_path / "data.txt"
    path.write_bytes(bytes(range(256)) * 64)
    list(iter_documents(str(path), "text", "input_ids"))
    assert "does not look like text (it holds NUL bytes)" in caplog.text


def test_a_text_file_gets_no_warning(tmp_path, caplog):
    path = tmp_path / "data.txt"
    path.write_text("héllo wörld\n\nsecond paragraph\n")
    assert [d.text for d in iter_documents(str(path), "text", "input_ids")] == ["héllo wörld\n", "second paragraph\n"]
    assert "does not look like text" not in caplog.text


def test_a_tokenizer_without_bos_or_eos_is_warned_about_under_prepend_bos(tmp_path, tiny_llama, text_dataset, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<x1>", "<x2>", "<pad>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    config = write_config(tmp_path, tiny_config(folder, text_dataset))
    r = cli(["harvest", "--config", config, "--run-dir", tmp_path / "run", "--plan-only", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "data.prepend_bos is set but the tokenizer" in caplog.text and "has no BOS token" in caplog.text
    assert "has no EOS token" in caplog.text


def test_a_document_on_one_huge_line_is_tokenised_in_bounded_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    line = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=60_000))  # ~250K characters, one line
    path = tmp_path / "one-line.txt"
    path.write_text(line + "\n\nw1 w2 w3\n")
    seen: list[int] = []
    tok = build_tokenizer()
    real = text_mod._encode

    def spy(tokenizer, docs):
        seen.extend(len(d.text) for d in docs)
        return real(tokenizer, docs)

    monkeypatch.setattr(text_mod, "_encode", spy)
    docs = list(iter_documents(str(path), "text", "input_ids"))
    assert max(len(d.text) for d in docs) <= 2 * MAX_PIECE_CHARS and len(docs) > 3
    pieces = list(pack_contexts(iter_token_documents(iter(docs), tok), 64, bos=1, eos=2))
    assert max(seen) <= 2 * MAX_PIECE_CHARS  # a piece plus the carried-over tail of the one before
    whole = [Document(text=line + "\n"), Document(text="w1 w2 w3\n")]
    monkeypatch.setattr(text_mod, "_encode", real)
    expected = list(pack_contexts(iter_token_documents(iter(whole), tok), 64, bos=1, eos=2))
    assert len(pieces) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(pieces, expected))


def test_negative_input_ids_are_named(tmp_path, tiny_llama):
    path = tmp_path / "ids.parquet"
    docs = [[5, 6, -3, 7] * 40 for _ in range(200)]
    pq.write_table(pa.table({"input_ids": docs}), path)
    config = write_config(tmp_path, tiny_config(tiny_llama, path))
    r = cli(["harvest", "--config", config, "--run-dir", tmp_path / "run", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "token id -3")


@pytest.mark.parametrize("flag, value, message", [("--seed", "-1", "harvest.seed (--seed) is -1")])
def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, small_cfg, flag, value, message):
    config = write_config(tmp_path, small_cfg)
    r = cli(["harvest", "--config", config, "--run-dir", tmp_path / "run", flag, value, "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, message)
    assert not (tmp_path / "run").exists()


def test_a_negative_fit_seed_is_refused(tmp_path, small_cfg):
    config = write_config(tmp_path, small_cfg)
    text = config.read_text()
    at = text.index("[fit]")
    config.write_text(text[:at] + text[at:].replace("seed = 0", "seed = -2", 1))
    r = cli(["fit", "--config", config, "--run-dir", tmp_path])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.seed is -2")


def test_too_many_groups_are_refused_before_tokenising(tmp_path, small_cfg, monkeypatch):
    import ghsae.harvest.plan as plan_mod

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised before checking --groups")

    monkeypatch.setattr(plan_mod, "write_contexts", no_tokenising)
    config = write_config(tmp_path, small_cfg)
    r = cli(["harvest", "--config", config, "--run-dir", tmp_path / "run", "--groups", "999", "--no-progress"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "grouping.groups (--groups) is 999 but only 6 layers are harvested")
    assert not (tmp_path / "run").exists()


def test_fit_on_a_missing_cuda_device_names_the_fit_option(tmp_path, small_cfg, harvested_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    config = write_config(tmp_path, small_cfg)
    r = cli(["fit", "--config", config, "--run-dir", harvested_run, "--device", "cuda"])
    assert r.exit_code == 2
    assert_one_line_error(r.output, "fit.device (--device) is cuda but torch sees no CUDA device")
