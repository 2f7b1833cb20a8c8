"""Property tests: corrupted shard headers give fp8conv's typed errors, never another exception.

Valid shards are corrupted at random (bytes flipped, inserted or deleted in the length prefix and the
header, the length prefix replaced, JSON values swapped for others) and read with read_header and with
the CLI. read_header may only raise Fp8convError subclasses; when it accepts a header, the layout it
returns must be sound. The CLI may only exit 0, 3, 4 or 5, print no traceback, and leave no file under
a final output name that does not parse.
"""

from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fp8conv.checkpoint.safetensors_io import DTYPES, read_header, save_file
from fp8conv.errors import Fp8convError
from tests.faultlib import MAKERS, bf16_shards, cli, final_files, fp8_shards, shard_name

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CLI_FUZZ = settings(FUZZ, max_examples=60)

_WORK = Path(tempfile.mkdtemp(prefix="fp8conv-fuzz-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


def _shard_bytes(tensors) -> bytes:
    p = _WORK / "seed.safetensors"
    save_file(tensors, p, {"format": "pt"})
    return p.read_bytes()


SEEDS = [_shard_bytes(fp8_shards()[1]), _shard_bytes(bf16_shards()[0])]


# ------------------------------------------------------------------------------------ mutations
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(sorted(DTYPES)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def json_mutation(draw, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    names = list(header)
    name = draw(st.sampled_from(names))
    op = draw(
        st.sampled_from(
            [
                "set_field",
                "drop_field",
                "add_field",
                "replace_entry",
                "rename",
                "drop_entry",
                "shape",
                "offsets",
                "dtype",
                "duplicate",
            ]
        )
    )
    entry = header[name]
    if op == "set_field" and isinstance(entry, dict):
        entry[draw(st.sampled_from(sorted(entry) or ["dtype"]))] = draw(json_values)
    elif op == "drop_field" and isinstance(entry, dict) and entry:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif op == "add_field" and isinstance(entry, dict):
        entry[draw(st.text(max_size=6))] = draw(json_values)
    elif op == "replace_entry":
        header[name] = draw(json_values)
    elif op == "rename":
        header[draw(st.text(max_size=20))] = header.pop(name)
    elif op == "drop_entry":
        header.pop(name)
    elif op == "shape" and isinstance(entry, dict) and "shape" in entry:
        entry["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
    elif op == "offsets" and isinstance(entry, dict) and "data_offsets" in entry:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = [a + draw(st.integers(-64, 64)), b + draw(st.integers(-64, 64))]
    elif op == "dtype" and isinstance(entry, dict):
        entry["dtype"] = draw(st.sampled_from(sorted(DTYPES)) | st.text(max_size=6))
    text = json.dumps(header, allow_nan=True).encode()
    if op == "duplicate":
        text = text[:-1] + b", " + json.dumps({name: entry}).encode()[1:]
    if draw(st.booleans()):
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def byte_mutation(draw, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    buf = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        end = min(len(buf), 8 + n)
        op = draw(st.sampled_from(["flip", "insert", "delete", "prefix", "prefix_delta", "truncate"]))
        i = draw(st.integers(0, max(end - 1, 0)))
        if op == "flip" and buf:
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        elif op == "prefix" and len(buf) >= 8:
            buf[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        elif op == "prefix_delta" and len(buf) >= 8:
            (cur,) = struct.unpack("<Q", bytes(buf[:8]))
            buf[:8] = struct.pack("<Q", max(0, cur + draw(st.integers(-16, 16))))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
    return bytes(buf)


@st.composite
def corrupted(draw, seeds=SEEDS):
    raw = draw(st.sampled_from(seeds))
    if draw(st.booleans()):
        return draw(json_mutation(raw))
    return draw(byte_mutation(raw))


# ------------------------------------------------------------------------------------ read_header
def _check_layout(h, size: int) -> None:
    pos = h.data_start
    for t in h.tensors.values():
        assert t.start == pos and t.end >= t.start
        assert t.nbytes == t.numel * t.torch_dtype.itemsize
        pos = t.end
    assert pos == size == h.file_size


@FUZZ
@given(blob=corrupted())
def test_read_header_raises_only_typed_errors(blob):
    p = _WORK / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        h = read_header(p)
    except Fp8convError as e:
        assert e.exit_code in (3, 5), e
        assert str(p) in e.message
        return
    _check_layout(h, len(blob))


# ------------------------------------------------------------------------------------ the CLI
_BASE = {kind: MAKERS[kind](_WORK / f"base-{kind}") for kind in MAKERS}


@pytest.mark.parametrize("kind", ["dequantize", "quantize"])
def test_cli_exit_codes_on_corrupted_headers(kind):
    base = _BASE[kind]
    seeds = [(base / shard_name(i, 3)).read_bytes() for i in (1, 2, 3)]
    count = [0]

    @CLI_FUZZ
    @given(which=st.integers(0, 2), data=st.data())
    def check(which, data):
        count[0] += 1
        blob = data.draw(corrupted([seeds[which]]))
        work = _WORK / f"cli-{kind}-{count[0]}"
        src, dst = work / "src", work / "dst"
        shutil.copytree(base, src)
        (src / shard_name(which + 1, 3)).write_bytes(blob)
        try:
            r = cli(kind, src, dst, "--device", "cpu", "-q")
            assert r.exception is None, f"{r.exception!r}"
            assert r.code in (0, 3, 4, 5), r
            assert "Traceback" not in r.stderr
            if r.code:
                assert f"error (exit {r.code})" in r.stderr
            for rel in final_files(dst):
                if rel.endswith(".safetensors"):
                    read_header(dst / rel)
            assert (src / shard_name(which + 1, 3)).read_bytes() == blob
        finally:
            shutil.rmtree(work)

    check()
