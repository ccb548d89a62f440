"""The token stream: documents from .txt/.jsonl/.parquet/.arrow (streamed), tokenised, packed into contexts.

Documents are joined with EOS and cut into fixed contexts, each starting with BOS when the
tokenizer has one and data.prepend_bos is set. Nothing here loads a whole file into memory:
jsonl, parquet and arrow come through pyarrow's batch readers (arrow memory-mapped), txt line by line.

Besides files, folders and globs, data.dataset may name a folder written by `datasets`'
save_to_disk (its arrow files, in the order its state.json lists them; a DatasetDict's train
split) or a Hub dataset id (`org/name`, `org/name/folder`, `org/name@revision`) that the local
Hugging Face cache holds: its snapshot is read like a folder, keeping the train split's files
when the file names carry splits (the Hub's naming: train-00000-of-00001.parquet, data/train/...).
Nothing is downloaded (ghsae.hub); `datasets` itself is not needed to read any of them.

The built-in corpus `builtin:python-docs` is CPython's own documentation: the pydoc topics
(pydoc_data) and the docstrings of the standard library's modules, about 2 MB of English
prose about code, present wherever Python is.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import logging
import math
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ghsae.errors import DatasetError, DiskError
from ghsae.hub import cached_snapshot, parse_hub_id
from ghsae.space import free_bytes, human

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
SAVED_DATASET = "state.json"  # what datasets' save_to_disk writes beside a Dataset's arrow files
SAVED_DATASET_DICT = "dataset_dict.json"  # and beside a DatasetDict's split folders
# split names in a file's path, as `datasets` reads a Hub repository without a loading script
_SPLIT_IN_PATH = re.compile(
    r"(?:^|[-._ 0-9/])(train|training|validation|valid|val|dev|test|testing|eval|evaluation)[-._ 0-9/]"
)
_TRAIN = ("train", "training")
BUILTIN_DATASETS = ("builtin:python-docs",)
_TOKENIZE_BATCH = 256
_TOKENIZE_CHARS = 1 << 20  # and at most about this many characters per call
MAX_PIECE_CHARS = 1 << 16  # longest text handed to the tokenizer at once (a long paragraph is cut)  # documents per tokenizer call: amortises the call overhead of fast tokenizers


@dataclass(frozen=True)
class Document:
    """One document: text to tokenise, or token ids already tokenised (parquet input_ids)."""

    text: str | None = None
    ids: list[int] | None = None
    joined: bool = False  # a piece of a longer text: the next document continues it (no EOS between)


class JoinedIds(list):
    """Token ids of a piece of a longer document: pack_contexts adds no EOS after it."""


@dataclass(frozen=True)
class DatasetFiles:
    """The files data.dataset names, in reading order, and the commit a Hub id resolved to."""

    files: list[Path]
    revision: str | None = None


def resolve_files(spec: str) -> list[Path]:
    """A file, a folder (searched recursively), a glob, a save_to_disk folder or a cached Hub dataset
    id, as the list of readable files it stands for (in reading order)."""
    return resolve_dataset(spec).files


def resolve_dataset(spec: str) -> DatasetFiles:
    if spec in BUILTIN_DATASETS:
        return DatasetFiles([])
    p = Path(spec).expanduser()
    revision = None
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = _saved_files(p) if _is_saved(p) else _folder_files(p)
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    elif spec.startswith("builtin:"):
        raise DatasetError(f"unknown built-in dataset {spec!r}; expected one of {', '.join(BUILTIN_DATASETS)}")
    else:
        hub = parse_hub_id(spec) if p.suffix not in SUFFIXES else None
        if hub is None:
            raise DatasetError(
                f"dataset {spec!r} not found; expected a file, folder or glob of {'/'.join(SUFFIXES)} files, "
                "a datasets save_to_disk folder or a Hub dataset id (org/name)"
            )
        snapshot = cached_snapshot(hub, "dataset", "dataset", DatasetError)
        files = _saved_files(snapshot.folder) if _is_saved(snapshot.folder) else _hub_files(snapshot.folder)
        revision = snapshot.revision
    if not files:
        raise DatasetError(f"dataset {spec!r} matches no {'/'.join(SUFFIXES)} files")
    bad = [f for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise DatasetError(f"dataset file {bad[0]} has suffix {bad[0].suffix!r}; expected one of {', '.join(SUFFIXES)}")
    return DatasetFiles(files, revision)


def _folder_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in SUFFIXES)


def _is_saved(folder: Path) -> bool:
    return (folder / SAVED_DATASET).is_file() or (folder / SAVED_DATASET_DICT).is_file()


def _saved_files(folder: Path) -> list[Path]:
    """A save_to_disk folder's arrow files in the dataset's order (a DatasetDict: its train split's)."""
    if (folder / SAVED_DATASET_DICT).is_file():
        splits = list(_read_json(folder / SAVED_DATASET_DICT).get("splits", []))
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise DatasetError(
                f"{folder} is a datasets DatasetDict with splits {', '.join(splits) or 'none'} and none is train; "
                f"name the split to read: --dataset {folder / (splits[0] if splits else 'SPLIT')}"
            )
        return _saved_files(folder / split)
    state = _read_json(folder / SAVED_DATASET)
    try:
        return [folder / str(entry["filename"]) for entry in state["_data_files"]]
    except (KeyError, TypeError) as e:
        raise DatasetError(
            f"{folder / SAVED_DATASET} lists no _data_files ({e!r}); expected a folder written by datasets' save_to_disk"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); expected a folder written by datasets' save_to_disk") from None


def _hub_files(folder: Path) -> list[Path]:
    """A Hub dataset snapshot's data files: the train split's when the paths name splits, else all."""
    files = _folder_files(folder)
    splits = {f: _split_of(f.relative_to(folder)) for f in files}
    if not any(splits.values()):
        return files
    train = [f for f in files if splits[f] in _TRAIN]
    if not train:
        found = sorted({s for s in splits.values() if s})
        raise DatasetError(
            f"{folder} holds the splits {', '.join(found)} and no train split; name a split's files with a glob: "
            f"--dataset '{folder}/**/*{found[0]}*'"
        )
    return train


def _split_of(relative: Path) -> str | None:
    match = _SPLIT_IN_PATH.search(relative.as_posix().lower())
    return match[1] if match else None


def dataset_description(spec: str) -> dict:
    """Names and sizes of the input files (the token array's hash is the real fingerprint)."""
    if spec in BUILTIN_DATASETS:
        import sys

        return {"spec": spec, "python": sys.version.split()[0]}
    found = resolve_dataset(spec)
    out: dict[str, Any] = {"spec": spec, "files": [[str(f), f.stat().st_size] for f in found.files]}
    if found.revision is not None:
        out["revision"] = found.revision
    return out


def iter_documents(spec: str, text_field: str, tokens_field: str) -> Iterator[Document]:
    if spec == "builtin:python-docs":
        yield from _python_docs()
        return
    for f in resolve_files(spec):
        if f.suffix == ".txt":
            yield from _txt_documents(f)
        elif f.suffix == ".jsonl":
            yield from _jsonl_documents(f, text_field)
        elif f.suffix == ".arrow":
            yield from _arrow_documents(f, text_field, tokens_field)
        else:
            yield from _parquet_documents(f, text_field, tokens_field)


def _txt_documents(path: Path) -> Iterator[Document]:
    """Paragraphs (blank-line separated) are documents, read in bounded pieces.

    Neither a long paragraph nor a long line is held whole: lines arrive at most MAX_PIECE_CHARS at
    a time, and a paragraph that grows past that is cut at its last whitespace into a piece marked
    `joined` (no EOS after it). A 20 MB single-line file peaked at 3.3 GB in the tokenizer when
    read whole. The whitespace starts the next piece, as a BPE tokenizer expects.
    """
    warn_if_not_text(path)
    parts: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        while line := fh.readline(MAX_PIECE_CHARS):
            if line.strip() or not line.endswith("\n"):  # a cut-off part of a long line is content
                parts.append(line)
                size += len(line)
                if size >= MAX_PIECE_CHARS:
                    text = "".join(parts)
                    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
                    cut = cut if cut > 0 else len(text)
                    yield Document(text=text[:cut], joined=True)
                    parts, size = [text[cut:]], len(text) - cut
            elif parts:
                yield Document(text="".join(parts))
                parts, size = [], 0
    if parts and "".join(parts).strip():
        yield Document(text="".join(parts))


def warn_if_not_text(path: Path, sample: int = 8192) -> None:
    """Warn when a .txt file's first bytes look binary (NUL bytes, or mostly invalid UTF-8)."""
    with open(path, "rb") as fh:
        head = fh.read(sample)
    if not head:
        return
    reason = None
    if b"\x00" in head:
        reason = "it holds NUL bytes"
    else:
        bad = head.decode("utf-8", errors="replace").count("\ufffd")
        if bad > len(head) // 100:  # a cut multi-byte character at the sample's end is one, not 1%
            reason = f"{bad} of its first {len(head)} bytes are not valid UTF-8"
    if reason:
        log.warning(
            "%s does not look like text (%s); it is read as UTF-8 with bad bytes replaced. Check data.dataset",
            path,
            reason,
        )


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.json as pj

    try:
        reader = pj.open_json(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for malformed json and empty files
        if path.stat().st_size == 0:
            return
        raise DatasetError(_jsonl_problem(path, text_field, e)) from e
    if text_field not in reader.schema.names:
        raise DatasetError(
            f"{path} has no field {text_field!r}; found {', '.join(reader.schema.names)}. Set data.text_field"
        )
    batches = iter(reader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a bad line past the first block fails here, mid-stream
            raise DatasetError(_jsonl_problem(path, text_field, e)) from e
        for text in batch.column(text_field).to_pylist():
            if text:
                yield Document(text=str(text))


def _jsonl_problem(path: Path, text_field: str, error: Exception) -> str:
    """The first bad line of a .jsonl file, numbered from 1 as editors count. pyarrow's own message
    counts rows from 0 and within its read block, so it names no line a user can find."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                return f"{path} line {number} is not valid JSON ({e}); fix or remove that line"
            if not isinstance(record, dict):
                return f"{path} line {number} is a JSON {type(record).__name__}, not an object; expected one object per line"
            value = record.get(text_field)
            if value is not None and not isinstance(value, str):
                return (
                    f"{path} line {number}: {text_field!r} holds {json.dumps(value)[:40]} "
                    f"({type(value).__name__}), not a string; fix that line or set data.text_field"
                )
    return f"{path} is not valid JSON lines: {error}"


def _parquet_documents(path: Path, text_field: str, tokens_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DatasetError(f"{path} is not a readable parquet file: {e}") from e

    def column(name: str) -> Iterator[list]:
        for batch in pf.iter_batches(columns=[name], batch_size=1024):
            yield batch.column(0).to_pylist()

    yield from _table_documents(path, pf.schema_arrow.names, column, text_field, tokens_field)


def _arrow_documents(path: Path, text_field: str, tokens_field: str) -> Iterator[Document]:
    """An arrow file (the IPC stream format save_to_disk and the datasets cache write, or the IPC
    file format), memory-mapped and read a record batch at a time."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise DatasetError(f"{path} is not a readable arrow file: {e}") from e
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))

        def column(name: str) -> Iterator[list]:
            for batch in batches:
                yield batch.column(name).to_pylist()

        yield from _table_documents(path, reader.schema.names, column, text_field, tokens_field)


def _table_documents(
    path: Path, names: list[str], column: Callable[[str], Iterator[list]], text_field: str, tokens_field: str
) -> Iterator[Document]:
    """Documents of a table's text column, or of its token column when it has no text column."""
    if text_field in names:
        for texts in column(text_field):
            for text in texts:
                if text:
                    yield Document(text=str(text))
    elif tokens_field in names:
        for rows in column(tokens_field):
            for ids in rows:
                if ids:
                    yield Document(ids=[int(i) for i in ids])
    else:
        raise DatasetError(
            f"{path} has neither a text column {text_field!r} nor a token column {tokens_field!r}; "
            f"found {', '.join(names)}. Set data.text_field or data.tokens_field"
        )


def _python_docs() -> Iterator[Document]:
    """CPython's documentation, pydoc topics and standard-library docstrings, in a fixed shuffled order.

    Shuffled (seed 0) because harvest takes a prefix and the report's held-out tokens come right
    after it: in file order the prefix would be all pydoc topics and the eval tail all docstrings.
    """
    import random

    texts = list(_python_doc_texts())
    random.Random(0).shuffle(texts)
    for text in texts:
        yield Document(text=text)


def _python_doc_texts() -> Iterator[str]:
    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield topics.topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:  # one-liners are mostly "Return x." and add little
                    yield doc


def iter_token_documents(docs: Iterator[Document], tokenizer) -> Iterator[list[int]]:
    """Token ids per document (JoinedIds for a piece another continues), tokenising text in batches."""
    pending: list[Document] = []
    chars = 0
    for doc in docs:
        if doc.ids is not None:
            yield from _encode(tokenizer, pending)
            pending, chars = [], 0
            yield doc.ids
        else:
            assert doc.text is not None
            pending.append(doc)
            chars += len(doc.text)
            # bounded in characters too: the tokenizer's per-token bookkeeping is ~100x the text's size
            if len(pending) >= _TOKENIZE_BATCH or chars >= _TOKENIZE_CHARS:
                yield from _encode(tokenizer, pending)
                pending, chars = [], 0
    yield from _encode(tokenizer, pending)


def _encode(tokenizer, docs: list[Document]) -> Iterator[list[int]]:
    if docs:
        encoded = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
        for doc, ids in zip(docs, encoded):
            yield JoinedIds(ids) if doc.joined else ids


def pack_contexts(
    token_docs: Iterator[list[int]], context_length: int, bos: int | None, eos: int | None
) -> Iterator[np.ndarray]:
    """Join documents with EOS and cut them into contexts of context_length, BOS first when given."""
    body = context_length - (1 if bos is not None else 0)
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        if eos is not None and not isinstance(ids, JoinedIds):
            buf.append(eos)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            yield np.asarray(([bos] if bos is not None else []) + chunk, dtype=np.int32)


def contexts_bytes(tokens: int, eval_tokens: int, context_length: int) -> int:
    """Bytes of tokens.npy for these settings: whole contexts of int32 ids, harvested then held out."""
    n_contexts = math.ceil(tokens / context_length) + math.ceil(eval_tokens / context_length)
    return n_contexts * context_length * np.dtype(np.int32).itemsize


def require_room_for_tokens(run_dir: Path, tokens: int, eval_tokens: int, context_length: int) -> None:
    """Refuse, before the folder is made, a harvest whose token array alone outgrows the free disk
    (--tokens 999999999999999 asked numpy for a 4 PB memmap and left a half-made run behind).
    The activation store, several times larger, is checked against the disk once the plan sizes it."""
    needed = contexts_bytes(tokens, eval_tokens, context_length)
    free = free_bytes(run_dir)
    if needed > free:
        raise DiskError(
            f"harvest.tokens (--tokens) is {tokens:,}: its token array alone needs {human(needed)} but the disk of "
            f"{run_dir} has {human(free)} free, and its activations many times more; lower --tokens (the default "
            "is 98,304) or use a --run-dir on a larger disk"
        )


def write_contexts(
    out_path: Path,
    contexts: Iterator[np.ndarray],
    n_contexts: int,
    context_length: int,
    dataset: str,
) -> str:
    """Fill a memory-mapped [n_contexts, context_length] int32 array; return its sha256 (the dataset fingerprint)."""
    arr = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.int32, shape=(n_contexts, context_length))
    h = hashlib.sha256()
    filled = 0
    for row in contexts:
        if filled == n_contexts:
            break
        arr[filled] = row
        h.update(row.tobytes())
        filled += 1
    arr.flush()
    del arr
    if filled < n_contexts:
        if filled == 0:
            raise DatasetError(f"dataset {dataset!r} holds no text (no full context of {context_length} tokens)")
        raise DatasetError(
            f"dataset {dataset!r} yields {filled} contexts of {context_length} tokens ({filled * context_length} tokens) "
            f"but harvest.tokens + harvest.eval_tokens need {n_contexts} ({n_contexts * context_length} tokens); "
            "lower --tokens or add data"
        )
    return h.hexdigest()[:16]
