"""Reading and writing safetensors shards, with fp8conv's own validation.

Written here rather than taken from the `safetensors` package because fp8conv needs three things that
package does not offer: (1) a header check that names the file, the tensor and the broken rule
instead of raising a generic error (the package accepts duplicate names, for one); (2) reading a byte
range of one tensor (row bands) so memory is bounded by pieces, not tensors or shards; (3) a writer
that streams tensors into a temporary file whose header is fixed up front and renames it only when
complete. The byte layout follows the format spec: an 8-byte little-endian header length, a JSON
header padded with spaces to a multiple of 8, then the data buffer; offsets are relative to it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8conv.errors import InvalidCheckpoint, ResourceError

# safetensors' own reader refuses headers above 100 MB; a real header is a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGN = 8

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

FP8_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a shard header; `start`/`end` are absolute offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]  # in data-offset order
    data_start: int
    file_size: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and validate a shard header; raise InvalidCheckpoint naming file, tensor and rule."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise InvalidCheckpoint(
                    f"file is {file_size} bytes, shorter than the 8-byte header length", file=path
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise InvalidCheckpoint(
                    f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit", file=path
                )
            if 8 + header_len > file_size:
                raise InvalidCheckpoint(
                    f"header length {header_len} runs past the end of the {file_size}-byte file "
                    "(truncated file?)",
                    file=path,
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ResourceError(f"cannot read: {e.strerror or e}", file=path) from e
    if len(raw) != header_len:
        raise ResourceError("file shrank while its header was read", file=path)
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> ShardHeader:
    header_len = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidCheckpoint(f"header is not valid UTF-8 (byte {e.start})", file=path) from e
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise InvalidCheckpoint("duplicate tensor name in header", file=path, tensor=e.key) from None
    except (ValueError, RecursionError) as e:  # ValueError: also integers past int_max_str_digits
        raise InvalidCheckpoint(f"header is not valid JSON ({e})", file=path) from None
    if not isinstance(obj, dict):
        raise InvalidCheckpoint("header is not a JSON object", file=path)
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidCheckpoint("__metadata__ must map strings to strings", file=path)
    data_start = 8 + header_len
    data_len = file_size - data_start
    entries: list[TensorInfo] = []
    for name, entry in obj.items():
        entries.append(_parse_entry(path, name, entry, data_start))
    entries.sort(key=lambda t: (t.start, t.end))
    expected = data_start
    for t in entries:
        if t.start > expected:
            raise InvalidCheckpoint(
                f"gap of {t.start - expected} bytes before this tensor's data", file=path, tensor=t.name
            )
        if t.start < expected:
            raise InvalidCheckpoint("data overlaps the previous tensor's data", file=path, tensor=t.name)
        expected = t.end
    used = expected - data_start
    if used > data_len:
        last = entries[-1].name if entries else None
        raise InvalidCheckpoint(
            f"data ends at byte {expected} but the file has {file_size} bytes (truncated file)",
            file=path,
            tensor=last,
        )
    if used < data_len:
        raise InvalidCheckpoint(
            f"{data_len - used} bytes past the last tensor's data (corrupt or appended file)",
            file=path,
        )
    return ShardHeader(
        path=path,
        metadata=metadata,
        tensors={t.name: t for t in entries},
        data_start=data_start,
        file_size=file_size,
    )


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidCheckpoint(
            "header entry must have exactly dtype, shape and data_offsets", file=path, tensor=name
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidCheckpoint(f"unsupported dtype {dtype!r}", file=path, tensor=name)
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidCheckpoint("shape must be a list of non-negative integers", file=path, tensor=name)
    offs = entry["data_offsets"]
    if not (
        isinstance(offs, list)
        and len(offs) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
    ):
        raise InvalidCheckpoint("data_offsets must be two non-negative integers", file=path, tensor=name)
    begin, end = offs
    if end < begin:
        raise InvalidCheckpoint(f"data_offsets end {end} < begin {begin}", file=path, tensor=name)
    want = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != want:
        raise InvalidCheckpoint(
            f"data_offsets span {end - begin} bytes but {dtype} {shape} needs {want}",
            file=path,
            tensor=name,
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


class ShardReader:
    """Reads byte ranges of tensors from one shard with positional reads (no mmap page faults)."""

    def __init__(self, header: ShardHeader) -> None:
        self.header = header
        try:
            self._fd = os.open(header.path, os.O_RDONLY)
        except OSError as e:
            raise ResourceError(f"cannot open: {e.strerror or e}", file=header.path) from e
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_into(self, buf: torch.Tensor, offset: int, tensor: str | None = None) -> None:
        """Fill the uint8 tensor `buf` from absolute file offset `offset`."""
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        n = len(view)
        while done < n:
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise ResourceError(
                    f"read failed: {e.strerror or e}", file=self.header.path, tensor=tensor
                ) from e
            if got == 0:
                raise ResourceError(
                    f"file ended at byte {offset + done}, expected {offset + n} "
                    "(it shrank or changed while being read)",
                    file=self.header.path,
                    tensor=tensor,
                )
            done += got

    def read_bytes(
        self, info: TensorInfo, start: int = 0, length: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bytes [start, start+length) of tensor `info` as a uint8 tensor."""
        if length is None:
            length = info.nbytes - start
        buf = out if out is not None else torch.empty(length, dtype=torch.uint8)
        self.read_into(buf[:length], info.start + start, info.name)
        return buf[:length]

    def read_tensor(self, info: TensorInfo) -> torch.Tensor:
        raw = self.read_bytes(info)
        return raw.view(info.torch_dtype).reshape(info.shape)


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and each tensor's absolute (start, end) in the file."""
    obj: dict = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offset = 0
    rel: dict[str, tuple[int, int]] = {}
    for name, dtype, shape in entries:
        n = math.prod(shape) * ITEMSIZE[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        rel[name] = (offset, offset + n)
        offset += n
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGN)
    prefix = struct.pack("<Q", len(text)) + text
    start = len(prefix)
    return prefix, {k: (start + a, start + b) for k, (a, b) in rel.items()}


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Whole shard into memory (tests and small files only)."""
    header = read_header(path)
    with ShardReader(header) as r:
        return {name: r.read_tensor(info) for name, info in header.tensors.items()}


def save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a shard in one go (tests and samples); the pipeline uses the streaming writer."""
    entries = [(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    prefix, _ = build_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for v in tensors.values():
            f.write(memoryview(v.contiguous().reshape(-1).view(torch.uint8).numpy()))
