"""Comparison with a reference checkpoint (--reference).

* FP8 CKPT, plain SRC (the original). fp8conv's quantizer is deterministic and gives the same bytes on
  CPU and GPU, so an output it wrote must equal a re-quantization of SRC bit for bit: codes and scales
  (`exact` mode; catches one code off by one step, a flipped sign, a scale off by one ulp). An FP8
  checkpoint some other tool made is judged by statistics instead (`statistical` mode): SQNR for the
  tensor and every tile, each tile's gain, and the cosine of X @ W^T. `--reference-mode auto` takes
  exact mode when at least one weight re-quantizes bit for bit (so the checkpoint is fp8conv's), else
  statistical; the report says which was used.
* Dequantized CKPT, FP8 SRC: each weight equals weight_dequant(source codes, source scale) bit for bit.
* Every other tensor both hold: byte for byte. And the same tensor names, allowing for the scales
  that come (quantize) and go (dequantize).

Bounds of the statistical mode (docs/verify.md): SQNR floor 20 dB (e4m3 gives ~31 dB on Gaussian
weights, 24 dB in the worst placement); tile gain within 1 % (measured sd 3.5e-4, max 2.1e-3 over the
llama sample's tiles); tiles whose largest |W| is below 448 * 2**-126 are not judged per tile.
"""

from __future__ import annotations

import math
import threading

import torch

from fp8conv.checkpoint.safetensors_io import DTYPES, FLOAT_DTYPES, FP8_WEIGHT_DTYPES
from fp8conv.kernels import fp4_dequant, scale_to_float32, weight_dequant, weight_quant
from fp8conv.verify import layouts as L
from fp8conv.verify.context import Band, Check, Context, TensorCheck, TensorData, position, scale_grid
from fp8conv.verify.report import fmt_num

DEFAULT_MIN_SQNR = 20.0
TILE_GAIN_TOL = 0.01
TINY_TILE_AMAX = 448.0 * 2.0**-126
MAX_NAME_FINDINGS = 20
REFERENCE_MODES = ("auto", "exact", "statistical")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tiles(x: torch.Tensor, bm: int, bn: int, op: str = "sum") -> torch.Tensor:
    """Per-tile sum (or amax) of a [r, n] band whose first row starts a tile row."""
    r, n = x.shape
    bm, bn = min(bm, r), min(bn, n)
    pr, pc = -r % bm, -n % bn
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    v = x.reshape((r + pr) // bm, bm, (n + pc) // bn, bn)
    return v.sum(dim=(1, 3)) if op == "sum" else v.amax(dim=(1, 3))


def _db(num: float, den: float) -> float:
    """10 log10(num / den) with the limits spelled out: exact -> inf, nothing to compare -> inf."""
    if math.isnan(num) or math.isnan(den):
        return float("nan")
    if den == 0:
        return float("inf")
    if num == 0:
        return float("-inf")
    return 10.0 * math.log10(num / den)


def _fp8_vs_original(ctx: Context, name: str) -> bool:
    return ctx.ref is not None and not ctx.ref_roles.fp8 and name in ctx.roles.fp8 and name in ctx.heavy


def _dequantized_vs_fp8(ctx: Context, name: str) -> bool:
    return (
        ctx.ref is not None and name in ctx.ref_roles.fp8 and name not in ctx.roles.fp8 and name in ctx.heavy
    )


def _dequantized_vs_fp4(ctx: Context, name: str) -> bool:
    return ctx.ref is not None and name in ctx.ref_fp4 and name not in ctx.roles.fp8 and name in ctx.heavy


class Fp4DequantizedComparison(TensorCheck):
    """A weight dequantized from packed FP4 codes (gpt-oss MXFP4, DeepSeek-V4 experts) equals
    fp4_dequant(source codes, source e8m0 scales), in the orientation the family's output takes, bit
    for bit. Read one expert at a time here (the codes are not row-banded like the output)."""

    name = "reference"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return _dequantized_vs_fp4(ctx, t.name)

    def begin(self, ctx: Context, t: TensorData) -> None:
        rec = t.record(ctx)
        rec.role = "dequantized_weight"
        qw = ctx.ref_fp4[t.name]
        if t.info.dtype not in FLOAT_DTYPES or tuple(t.info.shape) != tuple(qw.out_shape):
            rec.add(
                self.name,
                "fail",
                f"{t.info.dtype} {list(t.info.shape)} here, but the source's FP4 {qw.name!r} dequantizes "
                f"to a float {list(qw.out_shape)}",
            )
            return
        *lead, m, n = qw.shape
        experts = math.prod(lead)
        s_all = ctx.read(ctx.ref, qw.scale).view(torch.uint8).reshape(qw.layout.view).expand(qw.layout.grid)
        s_all = s_all.reshape(experts, m, -1)
        per_in = qw.codes.nbytes // max(experts, 1)
        dtype = DTYPES[t.info.dtype]
        isz = t.info.nbytes // max(t.info.numel, 1)
        per_out = m * n * isz
        iv = _INT_VIEW[isz]
        off, first = 0, None
        for e in range(experts):
            blocks = ctx.read(ctx.ref, qw.codes, e * per_in, per_in).view(m, -1, 16)
            want = fp4_dequant(blocks, s_all[e], dtype).reshape(m, n)
            if qw.transpose:
                want = want.t()
            want = want.contiguous()
            got = ctx.read(ctx.ckpt, t.info, e * per_out, per_out).view(dtype).reshape(want.shape)
            ne = want.view(iv) != got.view(iv)
            k = int(ne.sum())
            if k and first is None:
                i, j = (int(v) for v in ne.nonzero()[0])
                where = position((e, i, j) if lead else (i, j), bool(lead))
                first = f"({where}): expected {float(want[i, j])!r}, found {float(got[i, j])!r}"
            off += k
        rec.metrics["mismatched_elements"] = off
        if off:
            rec.add(
                self.name,
                "fail",
                f"{off} of {t.info.numel} element(s) differ from fp4_dequant(source); first at {first}",
            )
        else:
            rec.add(
                self.name,
                "pass",
                f"bit-identical to fp4_dequant(source {qw.name!r}, 1x32 e8m0 scales)"
                + (", transposed as the family loads it" if qw.transpose else ""),
            )


class OriginalComparison(TensorCheck):
    """An FP8 weight against the original float weight: exact re-quantization and statistics."""

    name = "reference"

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}
        self._lock = threading.Lock()

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return _fp8_vs_original(ctx, t.name)

    def begin(self, ctx: Context, t: TensorData) -> None:
        rec = t.record(ctx)
        why = None
        if t.name not in ctx.ref:
            why = "not in the reference checkpoint"
        else:
            r = ctx.ref.info(t.name)
            if tuple(r.shape) != tuple(t.info.shape):
                why = f"shape {list(t.info.shape)} but the reference has {list(r.shape)}"
            elif r.dtype not in FLOAT_DTYPES:
                why = f"reference tensor is {r.dtype}, not a float"
            elif t.scales is None:
                why = "cannot dequantize without a usable scale"
        if why is not None:
            rec.add(self.name, "fail", why)
            return
        t.ref_info = ctx.ref.info(t.name)
        use = ctx.usable[t.name]
        s_info, scheme = use.scale, use.scheme
        exact_why = None
        if ctx.opts.reference_mode == "statistical":
            exact_why = "statistical mode requested"
        elif not scheme.startswith("block"):
            exact_why = f"fp8conv writes block scales, this weight has a per-{scheme} scale"
        elif s_info.dtype != "F32":
            exact_why = f"fp8conv writes float32 scales, this one is {s_info.dtype}"
        elif t.info.dtype != "F8_E4M3":
            exact_why = f"fp8conv writes e4m3 codes, these are {t.info.dtype}"
        # compressed-tensors configs have no scale_fmt: power-of-two scales throughout say ue8m0
        declared = (ctx.qc or {}).get("scale_fmt")
        pow2 = t.scales.numel() > 0 and bool((torch.frexp(t.scales).mantissa == 0.5).all())
        scale_fmt = "ue8m0" if declared == "ue8m0" or (declared is None and pow2) else "float"
        t.state[self.name] = {
            "exact_why": exact_why,
            # statistics: always in statistical mode or where exact is impossible; else only for a
            # tensor whose first band already differs (another tool's output: auto may fall back),
            # since they cost more than the re-quantization itself
            "stats": exact_why is not None or ctx.opts.reference_mode == "statistical",
            "stats_partial": False,
            "scale_fmt": scale_fmt,
            "codes_off": 0,
            "first_code": None,
            "scales_off": 0,
            "first_scale": None,
            "tot_ref": 0.0,
            "tot_err": 0.0,
            "cos": [0.0, 0.0, 0.0],
            "worst_tile": (float("inf"), None),
            "worst_gain": (0.0, None, 1.0),
            "x64": torch.randn(
                ctx.opts.rows,
                t.k,
                generator=torch.Generator().manual_seed(ctx.opts.seed),
                dtype=torch.float64,
            ),
        }

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        st = t.state.get(self.name)
        if st is None:
            return
        blk = t.block
        bm, bn = blk
        wr_raw = b.ref_values()
        q = b.values()
        sb = b.tile_rows(t.scales, blk)
        if st["exact_why"] is None:
            qr, sr = weight_quant(wr_raw.to(ctx.device), blk, st["scale_fmt"])
            qr, sr = qr.cpu().view(torch.uint8).reshape(-1), sr.cpu().float()
            ne = qr != b.raw
            n = int(ne.sum())
            if n:
                st["codes_off"] += n
                if st["first_code"] is None:
                    j = int(ne.nonzero()[0])
                    st["first_code"] = (
                        f"({b.where(j // t.k, j % t.k)}): expected 0x{int(qr[j]):02X}, "
                        f"found 0x{int(b.raw[j]):02X}"
                    )
            sne = sr.view(torch.int32) != sb.contiguous().view(torch.int32)
            n = int(sne.sum())
            if n:
                st["scales_off"] += n
                if st["first_scale"] is None:
                    i, j = (int(v) for v in sne.nonzero()[0])
                    tile = (*((b.e,) if t.stacked else ()), b.r0 // bm + i, j)
                    st["first_scale"] = (
                        f"tile ({position(tile, t.stacked)}): expected {float(sr[i, j])!r}, "
                        f"found {float(sb[i, j])!r}"
                    )
        if not st["stats"]:
            if st["codes_off"] or st["scales_off"]:
                if b.e == 0 and b.r0 == 0:
                    st["stats"] = True
                else:
                    st["stats_partial"] = True
            if not st["stats"]:
                return
        wr = wr_raw.double()
        wq = weight_dequant(q, sb.contiguous(), blk, torch.float32).double()
        diff = wq - wr
        e_ref = _tiles(wr * wr, bm, bn)
        e_err = _tiles(diff * diff, bm, bn)
        cross = _tiles(wq * wr, bm, bn)
        amax = _tiles(wr.abs(), bm, bn, "amax")
        st["tot_ref"] += float(e_ref.sum())
        st["tot_err"] += float(e_err.sum())
        tsq = torch.where(e_err > 0, 10 * torch.log10(e_ref / e_err), torch.inf)
        tsq = torch.nan_to_num(tsq, nan=-torch.inf)
        judged = (amax >= TINY_TILE_AMAX) | ((amax == 0) & (e_err != 0))
        if bool(judged.any()):
            tt = torch.where(judged, tsq, torch.inf)
            j = int(tt.argmin())
            ti, tj = divmod(j, tt.shape[1])
            tile = (*((b.e,) if t.stacked else ()), b.r0 // bm + ti, tj)
            if float(tt.view(-1)[j]) < st["worst_tile"][0]:
                st["worst_tile"] = (float(tt.view(-1)[j]), tile)
            gain = torch.nan_to_num(cross / e_ref, nan=0.0, posinf=0.0, neginf=0.0)
            dev = torch.where(judged & (amax > 0), (gain - 1).abs(), 0.0)
            j = int(dev.argmax())
            if float(dev.view(-1)[j]) > st["worst_gain"][0]:
                ti, tj = divmod(j, dev.shape[1])
                tile = (*((b.e,) if t.stacked else ()), b.r0 // bm + ti, tj)
                st["worst_gain"] = (float(dev.view(-1)[j]), tile, float(gain.view(-1)[j]))
        x64 = st["x64"]
        yq, yr = x64 @ wq.t(), x64 @ wr.t()
        c = st["cos"]
        c[0] += float((yq * yr).sum())
        c[1] += float((yq * yq).sum())
        c[2] += float((yr * yr).sum())

    def end(self, ctx: Context, t: TensorData) -> None:
        st = t.state.pop(self.name, None)
        if st is None:
            return
        st.pop("x64")
        st["stacked"] = t.stacked
        st["numel"] = t.info.numel
        st["scales"] = t.scales.numel()
        st["block"] = t.block
        st["rec"] = t.record(ctx)
        with self._lock:
            self.results[t.name] = st

    def finish(self, ctx: Context) -> None:
        if not self.results:
            return
        mode = ctx.opts.reference_mode
        if mode == "auto":
            exact_ok = any(
                r["exact_why"] is None and not r["codes_off"] and not r["scales_off"]
                for r in self.results.values()
            )
            mode = "exact" if exact_ok else "statistical"
        ctx.reference_mode = mode
        for r in self.results.values():
            rec = r["rec"]
            have = r["stats"] and not r["stats_partial"]
            stats = self._stats(ctx, r) if have else ([], "")
            tail = f" [{stats[1]}]" if have else ""
            if mode == "exact":
                if r["exact_why"] is not None:
                    rec.add(self.name, "fail", f"exact comparison impossible: {r['exact_why']}{tail}")
                elif r["codes_off"] or r["scales_off"]:
                    parts = []
                    if r["codes_off"]:
                        parts.append(
                            f"{r['codes_off']} of {r['numel']} code(s) differ, first at {r['first_code']}"
                        )
                    if r["scales_off"]:
                        parts.append(
                            f"{r['scales_off']} of {r['scales']} scale(s) differ, first at {r['first_scale']}"
                        )
                    rec.add(
                        self.name,
                        "fail",
                        "not what an exact re-quantization of the reference gives: "
                        + "; ".join(parts)
                        + tail,
                    )
                else:
                    bm, bn = r["block"]
                    rec.add(
                        self.name,
                        "pass",
                        f"bit-identical to an exact re-quantization of the reference ({bm}x{bn} tiles, "
                        f"scale_fmt {r['scale_fmt']})",
                    )
            elif not have:
                rec.add(
                    self.name,
                    "fail",
                    "re-quantization differs from its first mismatch at "
                    f"{r['first_code'] or r['first_scale']} on, and the statistics of the bands before "
                    "it were not kept: rerun with --reference-mode statistical to judge this tensor "
                    "by its SQNR",
                )
            else:
                bad, summary = stats
                note = "" if r["exact_why"] is None else f" (statistical: {r['exact_why']})"
                if bad:
                    rec.add(self.name, "fail", "; ".join(bad) + f" [{summary}]{note}")
                else:
                    rec.add(self.name, "pass", summary + note)

    def _stats(self, ctx: Context, r: dict) -> tuple[list[str], str]:
        rec = r["rec"]
        stacked = r["stacked"]
        sqnr = _db(r["tot_ref"], r["tot_err"])
        dot, qq, rr = r["cos"]
        cos = dot / math.sqrt(qq * rr) if qq > 0 and rr > 0 else (1.0 if qq == rr == 0 else 0.0)
        worst_tile, worst_gain = r["worst_tile"], r["worst_gain"]
        rec.metrics.update(
            sqnr_db=sqnr, min_tile_sqnr_db=worst_tile[0], max_tile_gain_dev=worst_gain[0], output_cosine=cos
        )
        floor = ctx.opts.min_sqnr
        bad = []
        if not sqnr >= floor:
            bad.append(f"SQNR {fmt_num(sqnr)} dB < {floor:g} dB")
        if not worst_tile[0] >= floor:
            bad.append(
                f"tile ({position(worst_tile[1], stacked)}) SQNR {fmt_num(worst_tile[0])} dB < {floor:g} dB"
            )
        if not worst_gain[0] <= TILE_GAIN_TOL:
            bad.append(
                f"tile ({position(worst_gain[1], stacked)}) gain {worst_gain[2]:.4f} (dequantized"
                f"/original) is off by more than {TILE_GAIN_TOL:.0%}: wrong scale for that tile?"
            )
        if not math.isfinite(cos):
            bad.append("output cosine is NaN")
        summary = (
            f"SQNR {fmt_num(sqnr)} dB, worst tile {fmt_num(worst_tile[0])} dB, "
            f"max tile gain error {worst_gain[0]:.2e}, output cosine {cos:.6f}"
        )
        return bad, summary


class DequantizedComparison(TensorCheck):
    """A dequantized weight equals weight_dequant(source codes, source scale), bit for bit."""

    name = "reference"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return _dequantized_vs_fp8(ctx, t.name)

    def begin(self, ctx: Context, t: TensorData) -> None:
        rec = t.record(ctx)
        rec.role = "dequantized_weight"
        q_info = ctx.ref.info(t.name)
        why = None
        if t.info.dtype not in FLOAT_DTYPES:
            why = f"dtype {t.info.dtype}: a dequantized weight must be a float"
        elif tuple(t.info.shape) != tuple(q_info.shape):
            why = f"shape {list(t.info.shape)} but the source has {list(q_info.shape)}"
        else:
            scales = ctx.ref_roles.scale_names.get(t.name) or []
            if not scales:
                why = "the source FP8 tensor has no scale; nothing to compare with"
            else:
                s_info = ctx.ref.info(scales[0])
                use, bad = L.scale_use(ctx.ref_roles, q_info, s_info, L.block_from_config(ctx.ref_qc))
                if use is None or s_info.dtype not in L.SCALE_DTYPES:
                    why = f"source scale unusable: {bad if use is None else s_info.dtype}"
        if why is not None:
            rec.add(self.name, "fail", why)
            return
        raw = ctx.read(ctx.ref, s_info).view(s_info.torch_dtype)
        t.ref_info = q_info
        t.ref_block = use.tile
        t.ref_scales = scale_grid(scale_to_float32(raw).float(), use, t.experts)
        isz = t.info.nbytes // max(t.info.numel, 1)
        t.state[self.name] = {"iv": _INT_VIEW[isz], "n": 0, "first": None, "max": 0.0}

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        st = t.state.get(self.name)
        if st is None:
            return
        q = b.ref_values()
        want = weight_dequant(
            q, b.tile_rows(t.ref_scales, t.ref_block).contiguous(), t.ref_block, DTYPES[t.info.dtype]
        )
        got = b.values()
        ne = want.view(st["iv"]) != got.view(st["iv"])
        n = int(ne.sum())
        if n:
            st["n"] += n
            if st["first"] is None:
                j = int(ne.reshape(-1).nonzero()[0])
                st["first"] = (
                    f"({b.where(j // t.k, j % t.k)}): expected {float(want.reshape(-1)[j])!r}, "
                    f"found {float(got.reshape(-1)[j])!r}"
                )
            d = (want.double() - got.double()).abs()
            st["max"] = max(st["max"], float(torch.nan_to_num(d, nan=float("inf")).max()))

    def end(self, ctx: Context, t: TensorData) -> None:
        st = t.state.pop(self.name, None)
        if st is None:
            return
        rec = t.record(ctx)
        rec.metrics.update(mismatched_elements=st["n"], max_abs_diff=st["max"])
        bm, bn = t.ref_block
        if st["n"]:
            rec.add(
                self.name,
                "fail",
                f"{st['n']} of {t.info.numel} element(s) differ from weight_dequant(source); first at "
                f"{st['first']}; max |diff| {st['max']:.3g}",
            )
        else:
            rec.add(
                self.name,
                "pass",
                f"bit-identical to weight_dequant(source codes, scale) ({bm}x{bn} tiles, {t.info.dtype})",
            )

    def finish(self, ctx: Context) -> None:
        if ctx.reference_mode is None and ctx.ref is not None and L.is_quantized(ctx.ref_roles, None):
            ctx.reference_mode = "exact"


class SameBytes(TensorCheck):
    """A tensor that both checkpoints hold and no conversion changes is byte-identical."""

    name = "reference"

    def applies(self, ctx: Context, t: TensorData) -> bool:
        return (
            ctx.ref is not None
            and t.name in ctx.ref
            and not _fp8_vs_original(ctx, t.name)
            and not _dequantized_vs_fp8(ctx, t.name)
            and not _dequantized_vs_fp4(ctx, t.name)
        )

    def begin(self, ctx: Context, t: TensorData) -> None:
        a, b = t.info, ctx.ref.info(t.name)
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            t.record(ctx).add(
                self.name,
                "fail",
                f"{a.dtype} {list(a.shape)} here but {b.dtype} {list(b.shape)} "
                "in the reference (only quantized weights may change)",
            )
            return
        t.ref_info = b
        t.state[self.name] = [0, None]

    def band(self, ctx: Context, t: TensorData, b: Band) -> None:
        st = t.state.get(self.name)
        if st is None:
            return
        ref = b.ref_values().reshape(-1).view(torch.uint8)
        if not torch.equal(b.raw, ref):
            ne = b.raw != ref
            st[0] += int(ne.sum())
            if st[1] is None:
                isz = t.info.nbytes // max(t.info.numel, 1)
                j = int(ne.nonzero()[0]) // max(isz, 1)
                st[1] = f"({b.where(j // max(t.k, 1), j % max(t.k, 1))})"

    def end(self, ctx: Context, t: TensorData) -> None:
        st = t.state.pop(self.name, None)
        if st is None:
            return
        if st[0]:
            t.record(ctx).add(
                self.name, "fail", f"{st[0]} byte(s) differ from the reference; first in element {st[1]}"
            )
        elif t.rec is not None or t.name in ctx.heavy:
            t.record(ctx).add(self.name, "pass", "byte-identical to the reference")


class ReferenceNames(Check):
    """The same tensor names as the reference, allowing for the scales that come and go."""

    name = "reference"

    def run(self, ctx: Context) -> None:
        if ctx.ref is None:
            return
        ref, ckpt = ctx.ref, ctx.ckpt
        have = set(ckpt.weight_map) | set(ctx.unreadable)
        if L.is_quantized(ctx.ref_roles, ref.config):
            expected = set()
            found = ctx.ref_roles.detection
            for n in ref.weight_map:
                qw = found.weights.get(n) if found is not None else None
                if qw is not None and qw.element.packed and not L.is_quantized(ctx.roles, ckpt.config):
                    expected.add(qw.out_name)  # gpt-oss experts: the name without `_blocks`
                    continue
                base = ctx.ref_roles.scales.get(n)
                if base is not None and base in ckpt and ckpt.info(base).dtype not in FP8_WEIGHT_DTYPES:
                    continue  # the scale of a weight that was dequantized: gone, as it should be
                if n in ctx.ref_roles.artifacts and not L.is_quantized(ctx.roles, ctx.ckpt.config):
                    continue  # an activation / kv-cache scale: gone with the quantization
                expected.add(n)
            extra = sorted(set(ckpt.weight_map) - expected)
        else:
            expected = set(ref.weight_map)
            extra = sorted(set(ckpt.weight_map) - expected - set(ctx.roles.scales))
        missing = sorted(expected - have)
        for what, names, where in (
            ("missing from the checkpoint", missing, ref),
            ("not in the reference", extra, ckpt),
        ):
            for n in names[:MAX_NAME_FINDINGS]:
                ctx.fail(
                    self.name,
                    f"tensor {what}",
                    where.root / where.weight_map[n] if n in where.weight_map else where.root,
                    n,
                )
            if len(names) > MAX_NAME_FINDINGS:
                ctx.fail(self.name, f"{len(names) - MAX_NAME_FINDINGS} more tensor(s) {what}", where.root)
