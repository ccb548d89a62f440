from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import build_tokenizer, generate_documents
from ghsae.errors import DatasetError
from ghsae.harvest.text import iter_documents, iter_token_documents, pack_contexts, resolve_files, write_contexts


def texts(spec, **kw):
    return [
        d.text for d in iter_documents(str(spec), kw.get("text_field", "text"), kw.get("tokens_field", "input_ids"))
    ]


def test_txt_paragraphs_are_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\nstill first\n\nsecond\n\n\nthird\n")
    assert texts(p) == ["first line\nstill first\n", "second\n", "third\n"]


def test_jsonl_reads_the_named_field(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(5)))
    assert texts(p, text_field="body") == [f"doc {i}" for i in range(5)]


def test_jsonl_without_the_field_names_the_fields_found(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"no field 'text'; found body\. Set data\.text_field"):
        texts(p)


def test_parquet_text_column_and_pretokenised_ids(tmp_path):
    pq.write_table(pa.table({"text": ["a b", "c"]}), tmp_path / "t.parquet")
    pq.write_table(pa.table({"input_ids": [[5, 6, 7], [8]]}), tmp_path / "ids.parquet")
    assert texts(tmp_path / "t.parquet") == ["a b", "c"]
    docs = list(iter_documents(str(tmp_path / "ids.parquet"), "text", "input_ids"))
    assert [d.ids for d in docs] == [[5, 6, 7], [8]]


def test_parquet_without_either_column_is_refused(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match="neither a text column 'text' nor a token column 'input_ids'; found body"):
        texts(tmp_path / "t.parquet")


def test_folder_and_glob_are_read_in_sorted_order(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name)
    assert [f.name for f in resolve_files(str(tmp_path))] == ["a.txt", "b.txt"]
    assert [f.name for f in resolve_files(str(tmp_path / "*.txt"))] == ["a.txt", "b.txt"]


def test_missing_dataset_and_unsupported_suffix_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        resolve_files(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DatasetError, match="suffix '.csv'"):
        resolve_files(str(tmp_path / "x.csv"))
    with pytest.raises(DatasetError, match="matches no"):
        resolve_files(str(tmp_path / "*.parquet"))


def test_builtin_python_docs_is_deterministic_prose():
    first = [d.text for _, d in zip(range(50), iter_documents("builtin:python-docs", "text", "input_ids"))]
    again = [d.text for _, d in zip(range(50), iter_documents("builtin:python-docs", "text", "input_ids"))]
    assert first == again and sum(len(t) for t in first) > 10_000


def test_packing_joins_documents_with_eos_and_starts_contexts_with_bos():
    docs = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
    ctxs = list(pack_contexts(iter(docs), 4, bos=1, eos=2))
    assert [c.tolist() for c in ctxs] == [[1, 10, 11, 12], [1, 2, 13, 14], [1, 2, 15, 16], [1, 17, 18, 19]]
    no_bos = list(pack_contexts(iter(docs), 4, bos=None, eos=2))
    assert no_bos[0].tolist() == [10, 11, 12, 2]


def test_tokenised_stream_matches_the_tokenizer():
    tok = build_tokenizer()
    docs = generate_documents(3, seed=4)
    from ghsae.harvest.text import Document

    ids = list(iter_token_documents(iter(Document(text=t) for t in docs), tok))
    assert ids == [tok(t, add_special_tokens=False)["input_ids"] for t in docs]


def test_write_contexts_refuses_too_little_data(tmp_path):
    ctxs = (np.arange(4, dtype=np.int32) for _ in range(3))
    with pytest.raises(DatasetError, match="yields 3 contexts .* need 5"):
        write_contexts(tmp_path / "t.npy", ctxs, 5, 4, "d")
    with pytest.raises(DatasetError, match="holds no text"):
        write_contexts(tmp_path / "t.npy", iter([]), 5, 4, "d")
