"""The fault suite: output-path safety, input validation, resource failures, determinism.

Every case checks what the user sees (exit code, fp8conv's own message naming file / tensor / rule,
no traceback), that the source tree is unchanged (sha256, mtimes, entries), and that no incomplete
file sits under a final output name (each one present equals the clean run's).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import pytest
import torch

from fp8conv.checkpoint import output as output_mod
from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.checkpoint.safetensors_io import ShardReader, read_header
from fp8conv.convert import engine
from tests.faultlib import (
    MAKERS,
    SourceGuard,
    assert_clean_error,
    assert_no_partial,
    clean_run,
    cli,
    edit_header,
    edit_index,
    final_files,
    make_bf16,
    make_fp8,
    read_raw,
    run_process,
    shard_name,
    snapshot,
    tmp_leftovers,
    write_raw,
)

KINDS = ["quantize", "dequantize"]
S1, S2, S3 = (shard_name(i, 3) for i in (1, 2, 3))
CPU = ("--device", "cpu", "-q")


# ======================================================================================= output safety
def _layouts(tmp_path, src):
    """(name, DST) pairs that must be refused; the DST may not exist yet."""
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    parent_link = tmp_path / "parent-link"
    parent_link.symlink_to(tmp_path)
    return [
        ("DST is SRC", src, "same folder as SRC"),
        ("DST inside SRC (new)", src / "out", "inside SRC"),
        ("DST inside SRC (existing sub-folder)", src / "assets", "inside SRC"),
        ("DST contains SRC", tmp_path, "contains SRC"),
        ("DST is a symlink to SRC", link, "same folder as SRC"),
        ("DST reaches SRC through a linked parent", parent_link / "src", "same folder as SRC"),
        ("DST inside SRC through a link", link / "out", "inside SRC"),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_dst_overlapping_src_is_refused(tmp_path, kind):
    src = MAKERS[kind](tmp_path / "src")
    guard = SourceGuard(src)
    around = snapshot(tmp_path)
    for what, dst, needle in _layouts(tmp_path, src):
        for extra in ((), ("--overwrite",)):
            r = cli(kind, src, dst, *CPU, *extra)
            assert_clean_error(r, 6, needle)
            guard.check()
            assert snapshot(tmp_path).keys() == (around.keys() | {"link-to-src", "parent-link"}), what


@pytest.mark.parametrize("kind", KINDS)
def test_dst_with_other_content(tmp_path, kind):
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    before = snapshot(dst)
    assert_clean_error(cli(kind, src, dst, *CPU), 6, "holds other content", "--overwrite")
    assert snapshot(dst) == before
    r = cli(kind, src, dst, *CPU, "--overwrite")
    assert r.code == 0, r
    assert final_files(dst) == clean_run(kind)
    guard.check()


def test_dst_file_or_symlink_is_refused(tmp_path):
    src = make_fp8(tmp_path / "src")
    f = tmp_path / "file"
    f.write_text("x")
    assert_clean_error(cli("dequantize", src, f, *CPU), 6, "not a folder")
    assert_clean_error(cli("dequantize", src, f, *CPU, "--overwrite"), 6, "not a folder")
    assert f.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    link = tmp_path / "dst-link"
    link.symlink_to(empty)
    assert_clean_error(cli("dequantize", src, link, *CPU, "--overwrite"), 6, "symlink")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_never_writes_through_links_in_dst(tmp_path, kind):
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.safetensors").write_bytes(b"precious")
    (outside / "dir").mkdir()
    (outside / "dir" / "NOTICE.txt").write_text("precious too")
    dst.mkdir()
    (dst / S1).symlink_to(outside / "victim.safetensors")
    (dst / "assets").symlink_to(outside / "dir")
    (dst / "tokenizer.json").symlink_to(outside / "victim.safetensors")
    before = snapshot(outside)
    assert_clean_error(cli(kind, src, dst, *CPU), 6, "holds other content")
    r = cli(kind, src, dst, *CPU, "--overwrite")
    assert r.code == 0, r
    assert snapshot(outside) == before
    assert not any(p.is_symlink() for p in dst.rglob("*"))
    assert final_files(dst) == clean_run(kind)
    guard.check()


class _Crash(BaseException):
    pass


def _partial(monkeypatch, kind, src, dst, point="after_shard:1"):
    def hook(name, shard=None, settle=None):
        if point in (name, f"{name}:{shard}"):
            if settle is not None:
                settle()
            raise _Crash(point)

    with monkeypatch.context() as m, pytest.raises(_Crash):
        m.setattr(engine, "_fault_point", hook)
        cli(kind, src, dst, *CPU)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_never_writes_through_links_in_dst(tmp_path, monkeypatch, kind):
    """Links planted in a half-done DST (final names and the state folder's temporary names)."""
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    _partial(monkeypatch, kind, src, dst)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    (dst / S2).symlink_to(victim)
    (dst / "model.safetensors.index.json").symlink_to(victim)
    state, token = dst / STATE_DIR, output_mod.TOKEN  # this process's: the CLI runs in it
    (state / f"job.json.{token}.tmp").symlink_to(victim)
    (state / f"owner.{token}.tmp").symlink_to(victim)
    (state / f"part-1-of-1.{token}.tmp").symlink_to(victim)
    (state / "holders").mkdir(exist_ok=True)
    (state / "holders" / token).symlink_to(victim)
    (state / "tmp" / f"{S3}.{token}").symlink_to(victim)
    before, planted = snapshot(outside), snapshot(dst)
    assert_clean_error(cli(kind, src, dst, *CPU), 6, "symlink(s)", "--overwrite")
    assert snapshot(dst) == planted
    r = cli(kind, src, dst, *CPU, "--overwrite", "--json", "-")
    assert r.code == 0, r
    assert r.json()["shards_skipped"] == 1
    assert snapshot(outside) == before
    assert final_files(dst) == clean_run(kind)
    assert not any(p.is_symlink() for p in dst.rglob("*"))


def test_state_records_never_written_through_links(tmp_path):
    """The state writer itself: a link at its temporary name is replaced, not followed."""
    out = output_mod.OutputDir(tmp_path / "dst")
    out.state.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out.state / f"x.json.{output_mod.TOKEN}.tmp").symlink_to(victim)
    out.write_json_atomic(out.state / "x.json", {"a": 1})
    assert victim.read_text() == "precious"
    assert json.loads((out.state / "x.json").read_text()) == {"a": 1}
    assert not (out.state / f"x.json.{output_mod.TOKEN}.tmp").exists()


def test_linked_folders_in_dst_are_refused(tmp_path, monkeypatch):
    """A linked folder where output goes, in a half-done DST: refused; --overwrite replaces the link
    with a real folder (keeping finished shards); a linked state folder: refused, --overwrite starts over."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    _partial(monkeypatch, "dequantize", src, dst)
    outside = tmp_path / "outside"
    outside.mkdir()
    (dst / "assets").symlink_to(outside)
    r = cli("dequantize", src, dst, *CPU)
    assert_clean_error(r, 6, "assets", "symlink")
    assert list(outside.iterdir()) == []
    assert_no_partial(dst, clean_run("dequantize"))
    assert not (dst / S2).exists(), "refused only after converting"
    r = cli("dequantize", src, dst, *CPU, "--overwrite", "--json", "-")
    assert r.code == 0, r
    assert r.json()["shards_skipped"] == 1
    assert list(outside.iterdir()) == []
    assert final_files(dst) == clean_run("dequantize")

    # a linked state folder or part of it: the state is not trusted, --overwrite starts over
    for linked in ("tmp", "holders", ""):
        _partial(monkeypatch, "dequantize", src, dst := tmp_path / f"dst-{linked or 'state'}")
        if (dst / STATE_DIR / linked).exists():
            shutil.rmtree(dst / STATE_DIR / linked)
        (dst / STATE_DIR / linked).symlink_to(outside)
        assert_clean_error(cli("dequantize", src, dst, *CPU), 6, "symlink", "--overwrite")
        assert list(outside.iterdir()) == []
        r = cli("dequantize", src, dst, *CPU, "--overwrite", "--json", "-")
        assert r.code == 0, r
        assert r.json()["shards_skipped"] == 0
        assert list(outside.iterdir()) == []
        assert final_files(dst) == clean_run("dequantize")


def test_unreadable_state_is_refused(tmp_path, monkeypatch):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    _partial(monkeypatch, "dequantize", src, dst)
    (dst / STATE_DIR / "job.json").write_text("{garbage")
    assert_clean_error(cli("dequantize", src, dst, *CPU), 6, "cannot be read", "--overwrite")
    assert cli("dequantize", src, dst, *CPU, "--overwrite").code == 0
    assert final_files(dst) == clean_run("dequantize")


# ======================================================================================= validation
def _prefix(v):
    def f(root):
        p = root / S2
        b = p.read_bytes()
        p.write_bytes(struct.pack("<Q", v(len(b))) + b[8:])

    return f


def _raw_header(text: bytes, shard=S2):
    def f(root):
        _, data = read_raw(root / shard)
        write_raw(root / shard, text, data)

    return f


def _entry(tensor, shard=S1, **changes):
    def f(root):
        def g(h):
            h[tensor].update(changes)

        edit_header(root / shard, g)

    return f


def _shift_offsets(shard, delta, first_index, extra: bytes | int):
    """Move the data offsets of the entries from first_index on by delta; grow/shrink the data."""

    def f(root):
        header, data = read_raw(root / shard)
        names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        for k in names[first_index:]:
            header[k]["data_offsets"] = [o + delta for o in header[k]["data_offsets"]]
        data = data + extra if isinstance(extra, bytes) else data[:extra]
        write_raw(root / shard, header, data)

    return f


def _truncate(n):
    def f(root):
        p = root / S3
        p.write_bytes(p.read_bytes()[:-n])

    return f


def _append(root):
    with open(root / S3, "ab") as f:
        f.write(b"\0" * 16)


def _duplicate(root):
    header, data = read_raw(root / S2)
    name = "model.position_ids"
    text = "{" + json.dumps(header)[1:-1] + ", " + json.dumps({name: header[name]})[1:-1] + "}"
    assert text.count(f'"{name}"') == 2
    write_raw(root / S2, text.encode(), data)


def _index(fn):
    def f(root):
        edit_index(root, fn)

    return f


def _weight_map_set(tensor, shard):
    return _index(lambda ix: ix["weight_map"].__setitem__(tensor, shard))


def _symlink_out(root):
    outside = root.parent / "elsewhere"
    outside.mkdir()
    shutil.move(root / S3, outside / S3)
    (root / S3).symlink_to(outside / S3)


def _missing(root):
    (root / S2).unlink()
    (root / S3).unlink()


def _tensors(fn):
    """Mutate the tensors before the checkpoint is written (for make_fp8 / make_bf16)."""
    return ("tensors", fn)


def _set(shard, name, value):
    def f(shards):
        shards[shard][name] = value

    return f


def _poke(shard, name, index, value):
    def f(shards):
        t = shards[shard][name].clone()
        t[index] = value
        shards[shard][name] = t

    return f


def _poke_byte(shard, name, index, byte):
    def f(shards):
        t = shards[shard][name].clone()
        t.view(torch.uint8)[index] = byte
        shards[shard][name] = t

    return f


def _dup_tensor(shards):
    shards[2]["model.layers.0.input_layernorm.weight"] = torch.ones(256, dtype=torch.bfloat16)


def _write(rel, text):
    def f(root):
        (root / rel).write_bytes(text if isinstance(text, bytes) else text.encode())

    return f


def _fifo(root):
    os.mkfifo(root / "assets" / "pipe")


def _dangling(root):
    (root / "assets" / "gone.txt").symlink_to(root / "assets" / "nowhere.txt")


DQ, Q = "dequantize", "quantize"
QP = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
UP2 = "model.layers.2.mlp.up_proj.weight"
CASES = {
    # name: (command, mutation, exit code, [message parts])
    "header length huge": (DQ, _prefix(lambda n: 1 << 62), 3, [S2, "exceeds the"]),
    "header length beyond file": (DQ, _prefix(lambda n: n), 3, [S2, "runs past the end"]),
    "header length zero": (DQ, _prefix(lambda n: 0), 3, [S2, "not valid JSON"]),
    "file shorter than 8 bytes": (DQ, _write(S2, b"\1\0"), 3, [S2, "shorter than the 8-byte"]),
    "header not JSON": (DQ, _raw_header(b'{"a": '), 3, [S2, "not valid JSON"]),
    "header not an object": (DQ, _raw_header(b"[1, 2]"), 3, [S2, "not a JSON object"]),
    "header not UTF-8": (DQ, _raw_header(b'{"\xff": 1}'), 3, [S2, "not valid UTF-8"]),
    "header nested too deep": (DQ, _raw_header(b"[" * 100_000 + b"]" * 100_000), 3, [S2, "JSON"]),
    "header number too long": (DQ, _raw_header(b'{"a": ' + b"1" * 5000 + b"}"), 3, [S2, "JSON"]),
    "dtype not a string": (
        DQ,
        _entry("model.position_ids", S2, dtype=["I64"]),
        3,
        ["model.position_ids", "dtype"],
    ),
    "unknown dtype": (DQ, _entry(QP, dtype="F4"), 3, [S1, QP, "unsupported dtype 'F4'"]),
    "dtype vs offsets": (DQ, _entry(QP, dtype="BF16"), 3, [S1, QP, "data_offsets span"]),
    "shape vs offsets": (DQ, _entry(QP, shape=[256, 255]), 3, [S1, QP, "data_offsets span"]),
    "negative shape": (DQ, _entry(QP, shape=[-256, -256]), 3, [S1, QP, "shape"]),
    "offsets reversed": (
        DQ,
        _entry("model.position_ids", S2, data_offsets=[256, 0]),
        3,
        ["model.position_ids", "end 0 < begin 256"],
    ),
    "extra entry key": (DQ, _entry(QP, offsets=[0, 1]), 3, [QP, "exactly dtype, shape"]),
    "gap": (DQ, _shift_offsets(S2, 8, 1, b"\0" * 8), 3, [S2, "gap of 8 bytes"]),
    "overlap": (DQ, _shift_offsets(S2, -8, 1, -8), 3, [S2, "overlaps"]),
    "truncated": (DQ, _truncate(100), 3, [S3, "truncated"]),
    "bytes after the last tensor": (DQ, _append, 3, [S3, "16 bytes past the last tensor"]),
    "duplicate name": (DQ, _duplicate, 3, [S2, "duplicate tensor name", "model.position_ids"]),
    "metadata not strings": (
        DQ,
        lambda r: edit_header(r / S2, lambda h: h.__setitem__("__metadata__", {"format": 1})),
        3,
        [S2, "__metadata__"],
    ),
    "index: '..'": (DQ, _weight_map_set("lm_head.weight", "../" + S3), 3, ["'..'", "lm_head.weight"]),
    "index: absolute path": (
        DQ,
        _weight_map_set("lm_head.weight", "/etc/passwd.safetensors"),
        3,
        ["absolute", "lm_head.weight"],
    ),
    "index: sub-folder": (DQ, _weight_map_set("lm_head.weight", "assets/x.safetensors"), 3, ["sub-folders"]),
    "index: not safetensors": (
        DQ,
        _weight_map_set("lm_head.weight", "config.json"),
        3,
        ["not a .safetensors file"],
    ),
    "index: symlink leading out": (DQ, _symlink_out, 3, [S3, "symlink that leads outside"]),
    "index: missing shards": (DQ, _missing, 3, ["2 shard(s)", S2, S3, "missing"]),
    "index: tensor listed but absent": (
        DQ,
        _weight_map_set("model.ghost.weight", S1),
        3,
        ["model.ghost.weight", "does not hold it"],
    ),
    "index: tensor not listed": (
        DQ,
        _index(lambda ix: ix["weight_map"].pop("lm_head.weight")),
        3,
        [S3, "lm_head.weight", "missing from the index"],
    ),
    "tensor in two shards": (
        DQ,
        _tensors(_dup_tensor),
        3,
        ["model.layers.0.input_layernorm.weight", "present in two shards"],
    ),
    "index: not JSON": (DQ, _write("model.safetensors.index.json", "{"), 3, ["index", "not valid JSON"]),
    "index: not UTF-8": (DQ, _write("model.safetensors.index.json", b"\xff\xfe"), 3, ["not valid JSON"]),
    "index: nested too deep": (
        DQ,
        _write("model.safetensors.index.json", "[" * 100_000),
        3,
        ["index", "JSON"],
    ),
    "index: no weight_map": (DQ, _write("model.safetensors.index.json", "{}"), 3, ["no weight_map"]),
    "index: weight_map value": (DQ, _weight_map_set("lm_head.weight", 3), 3, ["lm_head.weight"]),
    "config: not JSON": (DQ, _write("config.json", "{"), 3, ["config.json", "not valid JSON"]),
    "config: number too long": (
        DQ,
        _write("config.json", '{"a": ' + "1" * 5000 + "}"),
        3,
        ["config.json", "JSON"],
    ),
    "config: not an object": (DQ, _write("config.json", "[]"), 3, ["config.json", "not a JSON object"]),
    "stray shard": (
        DQ,
        lambda r: shutil.copy(r / S3, r / "extra.safetensors"),
        3,
        ["extra.safetensors", "not named by the index"],
    ),
    "fifo in source": (DQ, _fifo, 3, ["pipe", "regular file"]),
    "dangling link in source": (DQ, _dangling, 3, ["gone.txt"]),
    "no model files": (
        DQ,
        lambda r: [(r / n).unlink() for n in (S1, S2, S3, "model.safetensors.index.json")],
        3,
        ["no model.safetensors.index.json or model.safetensors"],
    ),
    "scale shape": (
        DQ,
        _tensors(_set(0, QP + "_scale_inv", torch.ones(3, 2))),
        3,
        [S1, QP + "_scale_inv", "scale shape [3, 2] does not fit weight [256, 256]"],
    ),
    "scale dtype int": (
        DQ,
        _tensors(_set(0, QP + "_scale_inv", torch.ones(2, 2, dtype=torch.int32))),
        3,
        [QP + "_scale_inv", "scale dtype I32"],
    ),
    "scale dtype fp8": (
        DQ,
        _tensors(_set(0, QP + "_scale_inv", torch.ones(2, 2).to(torch.float8_e4m3fn))),
        3,
        [QP + "_scale_inv", "scale dtype F8_E4M3"],
    ),
    "scale missing": (DQ, _tensors(lambda s: s[0].pop(QP + "_scale_inv")), 3, [QP, "has no scale"]),
    "scale NaN": (
        DQ,
        _tensors(_poke(2, DOWN + "_scale_inv", (1, 2), float("nan"))),
        4,
        [S3, DOWN + "_scale_inv", "scale element [1, 2] is nan"],
    ),
    "scale Inf": (
        DQ,
        _tensors(_poke(2, DOWN + "_scale_inv", (0, 0), float("inf"))),
        4,
        [DOWN + "_scale_inv", "inf"],
    ),
    "scale zero": (
        DQ,
        _tensors(_poke(2, DOWN + "_scale_inv", (0, 1), 0.0)),
        4,
        [DOWN + "_scale_inv", "finite and > 0"],
    ),
    "scale negative": (
        DQ,
        _tensors(_poke(2, DOWN + "_scale_inv", (0, 1), -1.0)),
        4,
        [DOWN + "_scale_inv", "finite and > 0"],
    ),
    "FP8 NaN code": (
        DQ,
        _tensors(_poke_byte(2, DOWN, (130, 7), 0x7F)),
        4,
        [S3, DOWN, "NaN/Inf code at element [130, 7]"],
    ),
    "FP8 negative NaN code": (
        DQ,
        _tensors(_poke_byte(2, DOWN, (255, 511), 0xFF)),
        4,
        [DOWN, "element [255, 511]"],
    ),
    "FP8 NaN code in experts": (
        DQ,
        _tensors(_poke_byte(1, "model.layers.0.mlp.experts.gate_up_proj", (1, 3, 4), 0x7F)),
        4,
        ["gate_up_proj", "element [1, 3, 4]"],
    ),
    "quantize: NaN weight": (
        Q,
        _tensors(_poke(2, UP2, (300, 17), float("nan"))),
        4,
        [S3, UP2, "nan at element [300, 17]"],
    ),
    "quantize: Inf weight": (
        Q,
        _tensors(_poke(2, UP2, (5, 0), float("-inf"))),
        4,
        [UP2, "-inf at element [5, 0]"],
    ),
    "quantize: input already FP8": (
        Q,
        _tensors(_set(1, "model.layers.1.mlp.extra.weight", torch.zeros(128, 128).to(torch.float8_e4m3fn))),
        3,
        [S2, "model.layers.1.mlp.extra.weight", "already FP8"],
    ),
    "quantize: header length huge": (Q, _prefix(lambda n: 1 << 40), 3, [S2, "exceeds the"]),
    "quantize: truncated": (Q, _truncate(7), 3, [S3, "truncated"]),
}


def _build(kind, root, mutation):
    if isinstance(mutation, tuple):
        return MAKERS[kind](root, mutation[1])
    src = MAKERS[kind](root)
    mutation(src)
    return src


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_input(tmp_path, case):
    kind, mutation, code, needles = CASES[case]
    src, dst = _build(kind, tmp_path / "src", mutation), tmp_path / "dst"
    guard = SourceGuard(src)
    r = cli(kind, src, dst, *CPU)
    assert_clean_error(r, code, *needles)
    guard.check()
    if code == 3:
        assert not dst.exists(), "an invalid input was refused only after writing"
    assert_no_partial(dst, clean_run(kind), same_source=False)
    assert tmp_leftovers(dst) == []


def test_invalid_input_json_error(tmp_path):
    src = make_fp8(tmp_path / "src", _tensors(_poke_byte(2, DOWN, (0, 0), 0x7F))[1])
    r = cli("dequantize", src, tmp_path / "dst", *CPU, "--json", "-")
    assert r.code == 4
    payload = json.loads(r.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 4
    assert payload["tensor"] == DOWN and payload["file"].endswith(S3)


def test_unwritable_json_target_is_refused_before_any_work(tmp_path):
    """--json into a missing folder: exit 5 before anything is read or written (not after hours)."""
    src = make_fp8(tmp_path / "src", _tensors(_poke_byte(2, DOWN, (0, 0), 0x7F))[1])
    r = cli("dequantize", src, tmp_path / "dst", *CPU, "--json", tmp_path / "no" / "such" / "dir.json")
    assert_clean_error(r, 5, "cannot write the --json file", "does not exist")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "no").exists()
    src2 = make_fp8(tmp_path / "src2")
    r = cli("dequantize", src2, tmp_path / "dst2", *CPU, "--json", tmp_path)
    assert_clean_error(r, 5, "it is a folder")
    assert not (tmp_path / "dst2").exists()


def test_markup_like_names_are_printed_verbatim(tmp_path):
    """A tensor name is data: brackets in it must not be taken for console markup."""
    name = "model.[/].[bold]x.weight"
    src = make_bf16(
        tmp_path / "src", _tensors(_set(1, name, torch.full((128, 128), float("nan")).bfloat16()))[1]
    )
    r = cli("quantize", src, tmp_path / "dst", *CPU)
    assert_clean_error(r, 4, repr(name))


# ======================================================================================= resources
@pytest.mark.parametrize("kind", KINDS)
def test_file_size_limit_then_resume(tmp_path, kind):
    """Writes fail with EFBIG past RLIMIT_FSIZE (SIGXFSZ ignored), as on a full disk."""
    clean = clean_run(kind)
    assert len(clean[S1]) < len(clean[S3])
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    r = run_process(kind, src, dst, *CPU, fsize=(len(clean[S1]) + len(clean[S3])) // 2)
    assert_clean_error(r, 5, S3, "File too large", "rerun the same command to resume")
    assert_no_partial(dst, clean)
    assert (dst / S1).is_file() and not (dst / S3).exists()
    assert tmp_leftovers(dst) == []
    guard.check()
    r = cli(kind, src, dst, *CPU, "--json", "-")
    assert r.code == 0, r
    assert r.json()["shards_skipped"] >= 1
    assert final_files(dst) == clean
    guard.check()


def test_free_space_precheck(tmp_path, monkeypatch):
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    r = cli("dequantize", src, dst, *CPU)
    assert_clean_error(r, 5, "the output needs about", "is free", "free space or choose another DST")
    assert final_files(dst) == {}
    monkeypatch.undo()
    assert cli("dequantize", src, dst, *CPU).code == 0
    assert final_files(dst) == clean_run("dequantize")
    guard.check()


@pytest.mark.parametrize("kind", KINDS)
def test_source_shrinks_while_read(tmp_path, monkeypatch, kind):
    src, dst = MAKERS[kind](tmp_path / "src"), tmp_path / "dst"
    original = ShardReader.read_into

    def read_into(self, buf, offset, tensor=None):
        if self.header.path.name == S2:
            os.truncate(self.header.path, self.header.data_start + 16)
        return original(self, buf, offset, tensor)

    monkeypatch.setattr(ShardReader, "read_into", read_into)
    r = cli(kind, src, dst, *CPU)
    assert_clean_error(r, 5, S2, "shrank or changed while being read")
    assert_no_partial(dst, clean_run(kind))
    assert not (dst / S2).exists()
    assert tmp_leftovers(dst) == []


def test_source_shrinks_while_copied(tmp_path, monkeypatch):
    """Tensors copied as they are go file to file (copy_file_range): a shrink there is exit 5 too."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    original = engine.copy_range

    def copy_range(fd_in, *args):
        if os.readlink(f"/proc/self/fd/{fd_in}").endswith(S2):
            os.truncate(src / S2, 64)
        return original(fd_in, *args)

    monkeypatch.setattr(engine, "copy_range", copy_range)
    r = cli("dequantize", src, dst, *CPU)
    assert_clean_error(r, 5, "source ended early")
    assert_no_partial(dst, clean_run("dequantize"))
    assert tmp_leftovers(dst) == []


@pytest.mark.parametrize("where", ["job.json", S2, "owner"])
def test_state_write_failure_is_exit_5(tmp_path, monkeypatch, where):
    """ENOSPC while recording the job, committing a shard, or taking the lock (link(2))."""
    src, dst = make_fp8(tmp_path / "src"), tmp_path / "dst"
    guard = SourceGuard(src)
    name = "link" if where == "owner" else "replace"
    original = getattr(os, name)

    def failing(a, b, *args, **kw):
        if str(b).endswith(os.sep + where):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(a, b, *args, **kw)

    monkeypatch.setattr(output_mod.os, name, failing)
    r = cli("dequantize", src, dst, *CPU)
    assert_clean_error(r, 5, "No space left on device")
    assert_no_partial(dst, clean_run("dequantize"))
    monkeypatch.undo()
    r = cli("dequantize", src, dst, *CPU)
    assert r.code == 0, r
    assert final_files(dst) == clean_run("dequantize")
    guard.check()


def test_unwritable_dst_parent(tmp_path):
    src = make_fp8(tmp_path / "src")
    guard = SourceGuard(src)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("dequantize", src, blocker / "sub" / "dst", *CPU)
    assert_clean_error(r, 5, "preparing the output folder")
    assert blocker.read_text() == "x"
    guard.check()


# ======================================================================================= determinism
@pytest.mark.parametrize("kind", KINDS)
def test_two_runs_identical_and_order_stable(tmp_path, kind):
    src = MAKERS[kind](tmp_path / "src")
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(kind, src, a, *CPU).code == 0
    assert cli(kind, src, b, *CPU).code == 0
    assert final_files(a) == final_files(b) == clean_run(kind)
    for i in (1, 2, 3):
        names_in = list(read_header(src / shard_name(i, 3)).tensors)
        names_out = list(read_header(a / shard_name(i, 3)).tensors)
        if kind == "dequantize":
            want = [n for n in names_in if not n.endswith("_scale_inv")]
        else:
            want = []
            for n in names_in:
                want.append(n)
                if n + "_scale_inv" in names_out:
                    want.append(n + "_scale_inv")
        assert names_out == want
        raw, _ = read_raw(a / shard_name(i, 3))
        assert [k for k in raw if k != "__metadata__"] == want, "header order is not data order"
