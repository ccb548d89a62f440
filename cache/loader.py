"""The training loader: one group's rows, shuffled across shards, normalised on the device.

Order per epoch (a pure function of (seed, epoch), so a resumed run sees the same batches):
random shard order, random chunk order inside each shard, then a permutation inside a buffer of
`buffer_chunks` chunks (rows were already shuffled inside each shard at write time). Leftover rows
of a buffer carry into the next; the epoch's last batch may be short. Every stored row is
delivered exactly once per epoch.

Reading: raw (uncompressed) stores are memory-mapped straight out of the Zarr shard files (a
sharded array keeps its inner chunks end to end and an index of (offset, nbytes) pairs at the
end); compressed stores go through zarr. A background thread prepares each buffer one ahead:
it reads the chunks in order and writes every row once, to its shuffled place, into one of two
reused output buffers (see `host_batches`), so the host makes one copy of each row.

Device step: on CUDA, each host batch is copied into one of two reused pinned staging buffers and
sent with a non-blocking copy on a side stream while the previous batch trains; on the device one
fused step widens float16/bfloat16 to float32 and applies each row's layer normalisation
(x - mean[layer]) * scale[layer]. On CPU the same API runs the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ghsae.cache.dtypes import storage_dtype
from ghsae.cache.store import ActivationStore
from ghsae.errors import StoreError
from ghsae.layers import layer_lookup_table

_EMPTY_CHUNK = np.uint64(2**64 - 1)
_INDEX_CRC_BYTES = 4  # the shard index is followed by its crc32c


@dataclass(frozen=True)
class Piece:
    """Valid rows [start, stop) of one shard, inside one inner chunk."""

    shard: int
    start: int
    stop: int


@dataclass
class LoaderBatch:
    x: torch.Tensor  # [n, d] float32, normalised, on the loader's device
    layer: torch.Tensor  # [n] model layer of each row, on the device


@dataclass(frozen=True)
class _ShardFile:
    data: np.ndarray  # the whole file, memory-mapped as bytes
    index: np.ndarray  # [n_inner, 2] (offset, nbytes) of each inner chunk
    dtype: np.dtype
    width: tuple[int, ...]  # () for row metadata, (d,) for activations


class GroupReader:
    """Reads one group's valid rows (acts and layer ids) piece by piece."""

    def __init__(
        self,
        store: ActivationStore,
        group: str,
        shard_rows: dict[int, int],
        verify: Callable[[str, int], None] | None = None,
    ):
        self.verify = verify  # cache/verify.py's ShardVerifier: checks a shard the first time it is read
        self.store = store
        self.group = group
        self.shard_rows = dict(sorted(shard_rows.items()))
        self.geometry = store.geometry
        self.mmap = store.geometry.compression == "none"
        self._files: dict[tuple[str, int], _ShardFile] = {}

    @property
    def rows(self) -> int:
        return sum(self.shard_rows.values())

    def pieces(self, shard: int) -> list[Piece]:
        n, c = self.shard_rows[shard], self.geometry.chunk_rows
        return [Piece(shard, a, min(a + c, n)) for a in range(0, n, c)]

    def read(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        if self.verify is not None:
            self.verify(self.group, piece.shard)
        if self.mmap:
            return self._mmap_rows("acts", piece), self._mmap_rows("layer", piece)
        base = piece.shard * self.geometry.shard_rows
        rows = slice(base + piece.start, base + piece.stop)
        return np.asarray(self.store.array(self.group, "acts")[rows]), np.asarray(
            self.store.array(self.group, "layer")[rows]
        )

    def _mmap_rows(self, name: str, piece: Piece) -> np.ndarray:
        c = self.geometry.chunk_rows
        inner = piece.start // c
        shard_file = self._shard_file(name, piece.shard)
        offset, nbytes = shard_file.index[inner]
        if offset == _EMPTY_CHUNK:
            raise StoreError(
                f"{self.store.path}/{self.group}/{name}: shard {piece.shard} chunk {inner} is empty but its record lists rows there"
            )
        chunk = shard_file.data[int(offset) : int(offset + nbytes)].view(shard_file.dtype).reshape(c, *shard_file.width)
        return chunk[piece.start - inner * c : piece.stop - inner * c]

    def _shard_file(self, name: str, shard: int) -> _ShardFile:
        """The memory-mapped Zarr shard file of one array, with its chunk index parsed (once)."""
        key = (name, shard)
        if key not in self._files:
            arr = self.store.array(self.group, name)
            path = self.store.shard_file(self.group, name, shard)
            if not path.is_file():
                raise StoreError(
                    f"{path} is missing: shard {shard} of {self.group} is recorded done but has no data file"
                )
            data = np.memmap(path, dtype=np.uint8, mode="r")
            n_inner = self.geometry.shard_rows // self.geometry.chunk_rows
            end = data.size - _INDEX_CRC_BYTES
            index = data[end - n_inner * 16 : end].view("<u8").reshape(n_inner, 2)
            self._files[key] = _ShardFile(data, index, arr.dtype, arr.shape[1:])
        return self._files[key]


OUTLIER_HANDLING = ("keep", "drop", "clip")
"""What training does with a row whose norm exceeds its layer's outlier norm (a massive activation)."""


class ActivationLoader:
    def __init__(
        self,
        reader: GroupReader,
        batch_size: int,
        seed: int,
        device: torch.device,
        layers: list[int],
        scale: torch.Tensor,
        mean: torch.Tensor | None = None,
        buffer_chunks: int = 16,
        outliers: str = "keep",
        outlier_norm: torch.Tensor | None = None,
    ):
        self.reader = reader
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.logical_dtype = reader.geometry.dtype
        self.layer_lookup = layer_lookup_table(layers).to(device)
        self.scale = scale.float().to(device)
        self.mean = (mean if mean is not None else torch.zeros(len(layers), reader.geometry.d_model)).float().to(device)
        self.centred = mean is not None and bool(mean.any())  # subtracting zeros changes nothing: skip it
        self.buffer_chunks = buffer_chunks
        self.cuda = device.type == "cuda"
        if outliers not in OUTLIER_HANDLING:
            raise ValueError(f"outliers is {outliers!r}; expected one of {OUTLIER_HANDLING}")
        if outliers != "keep" and outlier_norm is None:
            raise ValueError(f"outliers = {outliers!r} needs each layer's outlier norm")
        self.outliers = outliers
        self.outlier_norm = None if outlier_norm is None else outlier_norm.float().to(device)  # [L], raw units

    @property
    def rows_per_epoch(self) -> int:
        return self.reader.rows

    def epoch_pieces(self, epoch: int) -> list[Piece]:
        rng = np.random.default_rng([self.seed, epoch])
        shards = list(self.reader.shard_rows)
        order: list[Piece] = []
        for i in rng.permutation(len(shards)):
            pieces = self.reader.pieces(shards[i])
            order.extend(pieces[j] for j in rng.permutation(len(pieces)))
        return order

    def host_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(acts [n, d] stored dtype, layer [n]) host batches of one epoch.

        The arrays are views into reused buffers, valid until the next batch is requested: a
        consumer copies (or widens) each before asking for the next, as `batches` does.

        Host work per buffer, in one background thread one buffer ahead of the consumer: the
        buffer is defined as [carry | its chunks in order] and shuffled by a permutation; instead
        of building that concatenation and permuting it, each chunk is read in order (straight out
        of the memory-mapped shard file for raw stores) and its rows are written once to their
        shuffled positions (the inverse permutation) in one of two reused output buffers, whose
        consecutive slices are the batches. One host copy per row, off the consumer's thread, and
        the batches and their order are those of the earlier concatenate-then-permute loader
        (checked against it when this was written).
        """
        pieces = self.epoch_pieces(epoch)
        buffers = [pieces[i : i + self.buffer_chunks] for i in range(0, len(pieces), self.buffer_chunks)]
        if not buffers:
            return
        geo, bs = self.reader.geometry, self.batch_size
        capacity = bs + max(sum(p.stop - p.start for p in buf) for buf in buffers)  # carry < bs rows

        def buffer_pair() -> tuple[np.ndarray, np.ndarray]:
            return np.empty((capacity, geo.d_model), dtype=geo.physical_dtype), np.empty(capacity, dtype=np.int16)

        shuffled = [buffer_pair(), buffer_pair()]  # permuted output, double-buffered
        carried = [0]  # rows of the last buffer's tail carried into the next

        def prepare(b: int) -> int:
            """Scatter buffer b's rows to their shuffled places in shuffled[b % 2]; returns its row count."""
            carry = carried[0]
            n = carry + sum(p.stop - p.start for p in buffers[b])
            perm = np.random.default_rng([self.seed, epoch, b]).permutation(n)
            dest = np.empty(n, dtype=np.intp)
            dest[perm] = np.arange(n)  # row j of [carry | chunks] lands at dest[j]
            ox, ol = shuffled[b % 2]
            if carry:  # the previous buffer's leftover rows: the tail of its shuffled output
                px, pl = shuffled[(b - 1) % 2]
                start = prev_rows[0] - carry
                ox[dest[:carry]] = px[start : prev_rows[0]]
                ol[dest[:carry]] = pl[start : prev_rows[0]]
            pos = carry
            for piece in buffers[b]:
                x, layer = self.reader.read(piece)
                ox[dest[pos : pos + len(x)]] = x
                ol[dest[pos : pos + len(x)]] = layer
                pos += len(x)
            carried[0] = n - n // bs * bs if b + 1 < len(buffers) else 0
            prev_rows[0] = n
            return n

        prev_rows = [0]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader-read") as pool:
            future: Future[int] | None = pool.submit(prepare, 0)
            for b in range(len(buffers)):
                assert future is not None
                n = future.result()
                # prepare(b + 1) writes shuffled[(b + 1) % 2], which held buffer b - 1, already consumed
                future = pool.submit(prepare, b + 1) if b + 1 < len(buffers) else None
                ox, ol = shuffled[b % 2]
                last = future is None
                full = n if last else n // bs * bs  # the last buffer's leftover is the short final batch
                for i in range(0, full, bs):
                    yield ox[i : min(i + bs, full)], ol[i : min(i + bs, full)]

    def batches(self, epoch: int, skip: int = 0) -> Iterator[LoaderBatch]:
        """Device batches of one epoch, after skipping the first `skip` (for resuming)."""
        host = (hb for i, hb in enumerate(self.host_batches(epoch)) if i >= skip)
        if self.cuda:
            yield from self._cuda_batches(host)
        else:
            for x, layer in host:
                yield self._device_step(
                    torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(layer.astype(np.int64))
                )

    def _device_step(self, raw: torch.Tensor, layer: torch.Tensor) -> LoaderBatch:
        """Widen to float32 and normalise each row by its layer's factors, on the device."""
        x = storage_dtype(self.logical_dtype).widen(raw)
        pos = self.layer_lookup[layer]
        if self.outliers != "keep":
            x, layer, pos = self._handle_outliers(x, layer, pos)
        if self.centred:
            x = x.sub_(self.mean[pos])  # in place: x is this step's own widened copy
        return LoaderBatch(x=x.mul_(self.scale[pos, None]), layer=layer)

    def _handle_outliers(self, x: torch.Tensor, layer: torch.Tensor, pos: torch.Tensor):
        """Rows whose norm (raw units) exceeds their layer's outlier norm: scaled down to it (clip) or
        left out of the batch (drop; a batch of outliers only is clipped instead of emptied)."""
        assert self.outlier_norm is not None
        norms = x.norm(dim=1)
        limit = self.outlier_norm[pos]
        if self.outliers == "drop":
            typical = norms <= limit
            if bool(typical.any()):
                return x[typical], layer[typical], pos[typical]
        x.mul_((limit / norms.clamp_min(1e-30)).clamp_max(1.0)[:, None])
        return x, layer, pos

    def _cuda_batches(self, host: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[LoaderBatch]:
        d = self.reader.geometry.d_model
        dtype = storage_dtype(self.logical_dtype)
        storage = dtype.physical_torch
        staging = [torch.empty((self.batch_size, d), dtype=storage, pin_memory=True) for _ in range(2)]
        staging_layer = [torch.empty((self.batch_size,), dtype=torch.long, pin_memory=True) for _ in range(2)]
        copied = [torch.cuda.Event(), torch.cuda.Event()]
        stream = torch.cuda.Stream(device=self.device)
        main = torch.cuda.current_stream(self.device)
        pending: tuple[torch.Tensor, torch.Tensor] | None = None
        for i, (x, layer) in enumerate(host):
            slot, n = i % 2, len(x)
            copied[slot].synchronize()  # the copy that last read this staging buffer has finished
            staging[slot][:n].copy_(dtype.as_physical_torch(x))
            staging_layer[slot][:n].copy_(torch.from_numpy(layer.astype(np.int64)))
            with torch.cuda.stream(stream):
                dev_x = staging[slot][:n].to(self.device, non_blocking=True)
                dev_l = staging_layer[slot][:n].to(self.device, non_blocking=True)
                copied[slot].record(stream)
            if pending is not None:
                yield self._device_step(*pending)
            main.wait_event(copied[slot])
            dev_x.record_stream(main)
            dev_l.record_stream(main)
            pending = (dev_x, dev_l)
        if pending is not None:
            yield self._device_step(*pending)
