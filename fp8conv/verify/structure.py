"""Structure checks: from headers, the index, config.json and side files only, over every tensor.

Each is a `Check` (name + run). Index/shard agreement and unreadable headers come from the scan
(fp8conv/verify/scan.py); what a layout allows comes from fp8conv/verify/layouts.py.
"""

from __future__ import annotations

from fp8conv.checkpoint.layout import CONFIG_NAME
from fp8conv.checkpoint.safetensors_io import TensorInfo
from fp8conv.verify import layouts as L
from fp8conv.verify.context import Check, Context
from fp8conv.verify.report import TensorRecord
from fp8conv.verify.scan import few, read_side_json


class QuantizationConfig(Check):
    """config.json's quantization settings agree with what the tensors are."""

    name = "config"

    def run(self, ctx: Context) -> None:
        cfg = ctx.ckpt.root / CONFIG_NAME
        roles = ctx.roles
        if not L.is_quantized(roles, ctx.ckpt.config):
            for loc in L.quantization_config_locations(ctx.ckpt.config):
                ctx.fail(
                    self.name,
                    f"no FP8 or packed tensors, but config.json still has {loc}: loaders would "
                    "build quantized layers for these plain weights",
                    cfg,
                )
            return
        if not roles.fp8:
            return  # packed-only layouts: formats.detect checked their structure
        qc, method = ctx.qc, ctx.method
        found = roles.detection
        if roles.detect_error is not None:
            e = roles.detect_error
            ctx.fail("layout", f"no layout family explains this checkpoint: {e.rule}", e.file, e.tensor)
        if found is not None and found.settings.quantized and method not in ("fp8", "compressed-tensors"):
            return  # ModelOpt, fbgemm, Mistral native, ...: the family's own settings check accepted them
        if qc is None:
            ctx.fail(
                self.name,
                f"{len(roles.fp8)} FP8 tensor(s) but config.json has no "
                f"quantization_config; loaders cannot load them: {few(roles.fp8)}",
                cfg,
            )
            return
        if method == "fp8":
            self._fp8(ctx, qc, cfg)
        elif method == "compressed-tensors":
            self._compressed_tensors(ctx, qc, cfg, found is not None)
        else:
            ctx.fail(
                self.name,
                f"quant_method {method!r}: verify checks fp8 and compressed-tensors FP8 checkpoints",
                cfg,
            )

    def _fp8(self, ctx: Context, qc: dict, cfg) -> None:
        fmt = qc.get("fmt")
        if fmt is not None and str(fmt).lower() not in L.FP8_FMTS:
            ctx.fail(self.name, f"quantization_config fmt {fmt!r} is not one of {', '.join(L.FP8_FMTS)}", cfg)
        per_tensor = all(n in ctx.usable and ctx.usable[n].one_per_matrix for n in ctx.roles.fp8)
        if qc.get("weight_block_size") is None:
            if not per_tensor:
                ctx.fail(
                    self.name,
                    "quantization_config has no weight_block_size: transformers "
                    "assumes 128x128 tiles, vLLM per-tensor scales",
                    cfg,
                    status="warn",
                )
        elif L.block_from_config(qc) is None:
            ctx.fail(
                self.name,
                f"weight_block_size {qc.get('weight_block_size')!r} is not two positive integers",
                cfg,
            )
        act = qc.get("activation_scheme")
        if act not in (None, "dynamic") and not per_tensor:
            ctx.fail(
                self.name,
                f"activation_scheme {act!r}: block-FP8 weights come with dynamic per-group activation scales",
                cfg,
                status="warn",
            )
        sf = qc.get("scale_fmt")
        if sf not in (None, "ue8m0", "float"):
            ctx.fail(self.name, f"scale_fmt {sf!r} is neither ue8m0 nor absent", cfg, status="warn")

    def _compressed_tensors(self, ctx: Context, qc: dict, cfg, family_read: bool) -> None:
        """The float-quantized group settings (formats' compressed-tensors family reads the rest, MXFP8
        among them, when it explained the checkpoint)."""
        groups = qc.get("config_groups")
        if family_read:
            pass  # formats' compressed-tensors family checked the groups (check_settings)
        elif not isinstance(groups, dict) or not groups:
            ctx.fail(self.name, "compressed-tensors quantization_config has no config_groups", cfg)
        else:
            for gname, g in groups.items():
                g = g if isinstance(g, dict) else {}
                w = g.get("weights") if isinstance(g.get("weights"), dict) else {}
                gfmt = g.get("format") or qc.get("format")
                where = f"config_groups.{gname}"
                if gfmt != "float-quantized":
                    ctx.fail(self.name, f"{where} format {gfmt!r}: FP8 weights are float-quantized", cfg)
                if w.get("type") != "float" or w.get("num_bits") != 8:
                    ctx.fail(
                        self.name,
                        f"{where}.weights is {w.get('num_bits')}-bit {w.get('type')!r}, not 8-bit float",
                        cfg,
                    )
                strategy = w.get("strategy")
                if strategy not in ("block", "channel", "tensor"):
                    ctx.fail(
                        self.name,
                        f"{where}.weights.strategy {strategy!r} is not block, channel or tensor",
                        cfg,
                    )
                bs = w.get("block_structure")
                if strategy == "block" and not (
                    isinstance(bs, list) and len(bs) == 2 and all(isinstance(v, int) and v > 0 for v in bs)
                ):
                    ctx.fail(
                        self.name, f"{where}.weights.block_structure {bs!r} is not two positive integers", cfg
                    )
        status = qc.get("quantization_status")
        if status != "compressed":
            ctx.fail(self.name, f"quantization_status {status!r}: FP8 weights on disk are 'compressed'", cfg)


class Fp8Weights(Check):
    """Each FP8 weight: its dtype agrees with the config, it has exactly one scale of the right name,
    encoding and shape, and no skip list covers it. Records the usable scales in ctx.usable."""

    name = "scale"

    def run(self, ctx: Context) -> None:
        want_dtype = L.expected_fp8_dtype(ctx.qc)
        cfg_block = L.block_from_config(ctx.qc)
        entries = L.ignore_entries(ctx.qc)
        for name, info in ctx.roles.fp8.items():
            rec = ctx.record(name, "fp8_weight")
            found = ctx.roles.detection
            declared = found is not None and found.settings.quantized
            if declared and want_dtype is None:
                rec.add("format", "pass", f"{found.family} layout ({found.settings.where()})")
            elif ctx.qc is None:
                rec.add(
                    "format",
                    "fail",
                    "FP8 tensor, but config.json has no quantization_config: "
                    "loaders cannot know it is quantized (an FP8 tensor left in a plain checkpoint?)",
                )
            elif want_dtype is not None and info.dtype != want_dtype:
                rec.add("format", "fail", f"dtype {info.dtype}, but quantization_config says {want_dtype}")
            elif want_dtype is None:
                rec.add("format", "fail", f"quant_method {ctx.method!r} does not describe FP8 weights")
            else:
                rec.add("format", "pass")
            self.scale(ctx, rec, info, cfg_block)
            if entries is not None:
                hit = L.listed_by(name, entries, ctx.method)
                if hit is not None:
                    rec.add(
                        "ignore_list",
                        "fail",
                        f"the layer is in {L.skip_list_key(ctx.qc)} (entry {hit!r}) "
                        "but its weight is FP8: loaders build an unquantized layer and load raw "
                        "FP8 codes into it",
                    )
                else:
                    rec.add("ignore_list", "pass")

    def scale(self, ctx: Context, rec: TensorRecord, info: TensorInfo, cfg_block) -> None:
        name = info.name
        scales = ctx.roles.scale_names.get(name, [])
        lost = [name + s for s in L.SCALE_SUFFIXES if name + s in ctx.unreadable]
        if len(info.shape) < 2:
            rec.add("scale", "fail", "FP8 tensor has fewer than 2 dimensions; no scale layout fits it")
            return
        if not scales:
            if lost:
                rec.add(
                    "scale",
                    "fail",
                    f"its scale {lost[0]!r} is in {ctx.unreadable[lost[0]]}, which cannot be read",
                )
            else:
                rec.add(
                    "scale",
                    "fail",
                    f"no scale: neither {name}_scale_inv nor {name}_scale is in "
                    "the checkpoint (an FP8 tensor without its scale cannot be dequantized)",
                )
            return
        problems = []
        if len(scales) > 1:
            problems.append(f"more than one scale ({', '.join(scales)}): loaders pick one")
        s = ctx.ckpt.info(scales[0])
        rec.metrics["scale"] = s.name
        want = L.expected_scale_suffix(ctx.qc)
        suffix = L.naming_problem(ctx.qc, s.name)
        if suffix is not None:
            problems.append(
                f"scale {s.name!r} is named *{suffix}, but quant_method {ctx.method} "
                f"loaders look for {name}{want} (mixed scale names)"
            )
        scale_fmt = (ctx.qc or {}).get("scale_fmt")
        usable_dtype = s.dtype in L.SCALE_DTYPES
        if not usable_dtype:
            problems.append(f"scale dtype {s.dtype} is not one of {', '.join(L.SCALE_DTYPES)}")
        elif ctx.method == "fp8" and s.dtype in L.EXPONENT_DTYPES and scale_fmt != "ue8m0":
            problems.append(
                f"scale dtype {s.dtype} holds exponent bytes, but quantization_config has "
                'no "scale_fmt": "ue8m0"'
            )
        elif ctx.method == "fp8" and s.dtype in ("BF16", "F16"):
            rec.add(
                "scale",
                "warn",
                f"scale dtype {s.dtype}: the fp8 loaders keep weight_scale_inv in float32 (they cast)",
            )
        elif (
            ctx.method == "compressed-tensors"
            and s.dtype not in ("F32", "BF16", "F16")
            and ctx.roles.detection is None
        ):
            problems.append(f"scale dtype {s.dtype}: compressed-tensors stores float scales")
        use, why = L.scale_use(ctx.roles, info, s, cfg_block)
        blk, scheme = (use.tile, use.scheme) if use is not None else (None, "")
        if use is None:
            problems.append(f"scale {s.name!r}: {why}")
        elif cfg_block is not None and scheme.startswith("block") and blk != cfg_block:
            problems.append(
                f"scale shape {list(s.shape)} means {blk[0]}x{blk[1]} tiles, but "
                f"quantization_config says {cfg_block[0]}x{cfg_block[1]}"
            )
        elif cfg_block is not None and not scheme.startswith(("block", "group")):
            problems.append(
                f"scale shape {list(s.shape)} is a per-{scheme} scale, but quantization_config says "
                f"{cfg_block[0]}x{cfg_block[1]} tiles (loaders would read it as tiles)"
            )
        if problems:
            rec.add("scale", "fail", "; ".join(problems))
        else:
            rec.add("scale", "pass")
        if use is not None and usable_dtype:
            ctx.usable[name] = use
            rec.metrics["block"] = f"{blk[0]}x{blk[1]}"


class UnlistedWeights(Check):
    """An unquantized 2-D float weight of an FP8 checkpoint is in the skip list."""

    name = "ignore_list"

    def run(self, ctx: Context) -> None:
        if not ctx.roles.fp8 or ctx.method not in ("fp8", "compressed-tensors"):
            return
        entries = L.ignore_entries(ctx.qc)
        key = L.skip_list_key(ctx.qc)
        unlisted = []
        for name in ctx.roles.unquantized:
            info = ctx.ckpt.info(name)
            if not L.linear_like(info):
                continue
            if entries is None:
                unlisted.append(name)
                continue
            if L.listed_by(name, entries, ctx.method) is not None:
                continue
            is_head = L.module_names(name)[0].split(".")[-1] == "lm_head"
            # fp8: transformers < 5 adds lm_head itself, and published releases the fp8 family reads
            # leave small gates unlisted (each loader's verdict is the targets report's); compressed-
            # tensors targets every Linear layer that `ignore` does not name
            lenient = is_head or ctx.roles.detection is not None
            status = "warn" if lenient and ctx.method == "fp8" else "fail"
            ctx.record(name, "weight").add(
                self.name,
                status,
                f"unquantized {info.dtype} 2-D weight is not in "
                f"{key}: a loader that quantizes every Linear layer expects an FP8 "
                "weight and a scale here"
                + (" (transformers <5 adds lm_head itself)" if status == "warn" else ""),
            )
        if entries is None and unlisted:
            ctx.fail(
                "config",
                f"quantization_config has no {key}: {len(unlisted)} "
                f"unquantized 2-D weight(s) rely on each loader's own defaults: {few(unlisted)}",
                ctx.ckpt.root / CONFIG_NAME,
                status="warn",
            )


class OrphanScales(Check):
    """A scale whose weight is missing or not FP8 (in a dequantized checkpoint every scale is one)."""

    name = "orphan"

    def run(self, ctx: Context) -> None:
        quantized = L.is_quantized(ctx.roles, ctx.ckpt.config)
        for name, why in ctx.roles.orphans.items():
            extra = "" if quantized else "; a dequantized checkpoint keeps no scale tensors"
            ctx.record(name, "scale").add(self.name, "fail", f"orphan scale: {why}{extra}")


class Leftovers(Check):
    """A checkpoint with no FP8 or packed tensor (a dequantized one) keeps nothing of quantization:
    no activation / kv-cache scale, no packed FP4 companion, no quantization settings in config.json
    (top level or text_config; quantization_config or compression_config, see QuantizationConfig),
    no hf_quant_config.json, no params.json `quantization`."""

    name = "leftover"

    def run(self, ctx: Context) -> None:
        if L.is_quantized(ctx.roles, ctx.ckpt.config):
            return
        for name, kind in ctx.roles.artifacts.items():
            ctx.record(name, "scale").add(
                self.name,
                "fail",
                f"{kind} tensor in a checkpoint without FP8 weights: a loader that finds it builds a "
                "quantized layer (dequantize should have dropped it)",
            )
        findings = []
        params = read_side_json(ctx.ckpt.root, L.PARAMS_FILE, findings)
        for f in findings:
            ctx.out.add(f)
        for lo in L.leftovers(ctx.ckpt, params if isinstance(params, dict) else None):
            if lo.kind in ("side_file", "params_key"):
                ctx.fail(
                    self.name,
                    f"{lo.rule}: {lo.name} in a checkpoint without FP8 weights; a loader that finds it "
                    "treats these plain weights as quantized",
                    ctx.ckpt.root / lo.where,
                )
            elif lo.kind != "config_key" and lo.name in ctx.ckpt and lo.name not in ctx.roles.fp8:
                rec = ctx.record(lo.name, "scale")
                if lo.name not in ctx.roles.orphans and lo.name not in ctx.roles.artifacts:
                    rec.add(self.name, "fail", f"{lo.rule} ({lo.kind})")


STRUCTURE_CHECKS: tuple[type[Check], ...] = (
    Fp8Weights,
    QuantizationConfig,
    UnlistedWeights,
    OrphanScales,
    Leftovers,
)


def _recorded_checksum_ok():
    """The output layer's reader of the content checksum fp8conv records in each shard it writes, or
    None in a build whose output layer records none."""
    try:
        from fp8conv.checkpoint.output import recorded_checksum_ok
    except ImportError:
        return None
    return recorded_checksum_ok


class ShardChecksums(Check):
    """Each shard fp8conv wrote still matches the content checksum recorded in its own header when it
    was written (a byte flipped or a shard zeroed afterwards, its mtime restored or not). It covers
    every shard whole, so it runs when the whole checkpoint is verified (no --sample, no --tensors):
    after the data checks, taking the CRC-32 of each tensor they read as they read it, and reading
    only the rest (each byte read once). Shards with no recorded checksum (not written by fp8conv) are
    counted, not judged."""

    name = "checksum"

    def __init__(self) -> None:
        self.checked = 0
        self.absent = 0

    def run(self, ctx: Context) -> None:
        reader = _recorded_checksum_ok()
        if reader is None or ctx.opts.sample is not None or ctx.opts.tensors:
            return
        from concurrent.futures import ThreadPoolExecutor

        names = list(ctx.ckpt.shards)
        paths = [ctx.ckpt.root / name for name in names]
        known = ctx.crc_digests()
        with ThreadPoolExecutor(min(4, max(1, len(paths)))) as pool:
            results = list(pool.map(lambda p: reader(p, known), paths))
        for name, path, ok in zip(names, paths, results, strict=True):
            if ok is None:
                self.absent += 1
                continue
            self.checked += 1
            tensors = ctx.ckpt.shards[name].tensors.values()
            ctx.bytes_read += sum(i.nbytes for i in tensors if (i.start, i.end) not in known)
            if not ok:
                ctx.fail(
                    self.name,
                    "content differs from the checksum fp8conv recorded in this shard when it wrote it "
                    "(changed or damaged since; rerun the conversion to redo it)",
                    path,
                )
