"""Layout knowledge verify and inspect need, in one place: which tensor is an FP8 weight, which its
scale and how that scale broadcasts, which tensors and config keys are quantization artifacts.

This is verify's adapter over the checkpoint layouts: nothing else under `fp8conv/verify/` branches on a
quantization method, a scale suffix or an artifact name. It is meant to read `fp8conv/formats/` (one
module per layout family) once that layer exists; until then the rules below are the ones
docs/verify.md documents, written from /work/shared/FORMATS.md.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES, FP8_WEIGHT_DTYPES, TensorInfo

SCALE_SUFFIXES = ("_scale_inv", "_scale")
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")
EXPONENT_DTYPES = ("F8_E8M0", "U8")  # scale bytes that are biased power-of-two exponents
PACKED_DTYPES = ("U8", "I8", "I32")

# Last name components that are quantization artifacts and never a model parameter: activation and
# kv-cache scales (compressed-tensors static FP8, AutoFP8, ModelOpt, Mistral `qscale_act`), second-
# level and global scales (NVFP4), zero points, and packed-weight companions (compressed-tensors
# `weight_packed`/`weight_shape`).
ARTIFACT_LEAVES = frozenset(
    {
        "input_scale",
        "activation_scale",
        "k_scale",
        "v_scale",
        "q_scale",
        "kv_scale",
        "output_scale",
        "qscale_act",
        "weight_scale_2",
        "input_global_scale",
        "weight_global_scale",
        "weight_zero_point",
        "input_zero_point",
        "weight_packed",
        "weight_shape",
    }
)
# Packed FP4 blocks and their exponent scales (gpt-oss MXFP4: `..._blocks` U8, `..._scales` U8).
PACKED_RE = re.compile(r"_(blocks|scales)$")

# Name fragments of embedding tables: 2-D float `.weight`s that are not Linear layers.
EMBED_HINTS = ("embed", "wte", "wpe")

# Where quantization settings live besides config.json's `quantization_config`.
SIDE_FILES = {"hf_quant_config.json": "ModelOpt quantization settings (vLLM reads them)"}
PARAMS_FILE = "params.json"  # Mistral native: a "quantization" key


# --------------------------------------------------------------------------------------- config
def quantization_config(config: dict | None) -> dict | None:
    if not isinstance(config, dict):
        return None
    for where in (config, config.get("text_config")):
        if isinstance(where, dict):
            for key in ("quantization_config", "compression_config"):
                if isinstance(where.get(key), dict):
                    return where[key]
    return None


def quantization_config_locations(config: dict | None) -> list[str]:
    """Every place of config.json that holds quantization settings (a dequantized output keeps none)."""
    out = []
    if isinstance(config, dict):
        for key in ("quantization_config", "compression_config"):
            if key in config:
                out.append(key)
        tc = config.get("text_config")
        if isinstance(tc, dict):
            for key in ("quantization_config", "compression_config"):
                if key in tc:
                    out.append(f"text_config.{key}")
    return out


def quant_method(ckpt: Checkpoint) -> str | None:
    qc = quantization_config(ckpt.config)
    return None if qc is None else str(qc.get("quant_method"))


def block_from_config(qc: dict | None) -> tuple[int, int] | None:
    qc = qc or {}
    wbs = qc.get("weight_block_size")
    if wbs is None:
        groups = qc.get("config_groups")
        if isinstance(groups, dict):
            for g in groups.values():
                w = g.get("weights") if isinstance(g, dict) else None
                if isinstance(w, dict) and w.get("block_structure") is not None:
                    wbs = w["block_structure"]
                    break
    if isinstance(wbs, list) and len(wbs) == 2 and all(isinstance(v, int) and v > 0 for v in wbs):
        return int(wbs[0]), int(wbs[1])
    return None


def expected_fp8_dtype(qc: dict | None) -> str | None:
    method = (qc or {}).get("quant_method")
    if method == "fp8":
        fmt = str(qc.get("fmt") or "e4m3").lower()
        return {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}.get(fmt)
    if method in ("compressed-tensors", "modelopt", "fbgemm_fp8"):
        return "F8_E4M3"
    return None


def expected_scale_suffix(qc: dict | None) -> str | None:
    """The scale name loaders look for: `_scale_inv` for block fp8 (DeepSeek, transformers'
    FineGrainedFP8); `_scale` for per-tensor fp8 (no weight_block_size: AutoFP8, RedHatAI static FP8),
    compressed-tensors, ModelOpt and fbgemm."""
    method = (qc or {}).get("quant_method")
    if method == "fp8":
        return "_scale_inv" if qc.get("weight_block_size") is not None else "_scale"
    if method in ("compressed-tensors", "modelopt", "fbgemm_fp8"):
        return "_scale"
    return None


def skip_list_key(qc: dict | None) -> str:
    return "ignore" if (qc or {}).get("quant_method") == "compressed-tensors" else "modules_to_not_convert"


def ignore_entries(qc: dict | None) -> list[str] | None:
    """The modules a loader leaves unquantized, or None when the config gives no list."""
    if not qc:
        return None
    keys = (
        ("ignore",)
        if qc.get("quant_method") == "compressed-tensors"
        else ("modules_to_not_convert", "ignored_layers")
    )
    found = [qc[k] for k in keys if isinstance(qc.get(k), list)]
    if not found:
        return None
    return [str(e) for lst in found for e in lst]


def module_names(name: str) -> list[str]:
    """Names a skip list may use for the layer holding tensor `name`."""
    if name.endswith(".weight"):
        return [name[: -len(".weight")]]
    return [name, name.rsplit(".", 1)[0]] if "." in name else [name]


def listed_by(name: str, entries: list[str], method: str | None) -> str | None:
    """The skip-list entry that covers tensor `name`'s layer, following the loader's own rule:
    compressed-tensors matches exact names and `re:` regexes (re.match); transformers matches a
    regex from the start up to a module boundary, or a plain suffix."""
    for module in module_names(name):
        for e in entries:
            if method == "compressed-tensors":
                if e.startswith("re:"):
                    try:
                        if re.match(e[3:], module):
                            return e
                    except re.error:
                        continue
                elif e == module:
                    return e
            else:
                try:
                    if re.match(rf"(?:{e})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(e):
                        return e
                except re.error:
                    if module == e or module.endswith(e):
                        return e
    return None


def linear_like(info: TensorInfo) -> bool:
    """A 2-D float `.weight` that is not an embedding table: what loaders turn into Linear layers."""
    low = info.name.lower()
    return (
        info.dtype in FLOAT_DTYPES
        and len(info.shape) == 2
        and info.name.endswith(".weight")
        and not any(h in low for h in EMBED_HINTS)
    )


# ------------------------------------------------------------------------------------------ scales
def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, math.ceil(m / block[0]), math.ceil(n / block[1]))


def scale_scheme(w: TensorInfo, s: TensorInfo, cfg_block: tuple[int, int] | None):
    """(block, scheme) a scale of shape s.shape gives weight w, or (None, why-not).

    Tiles of the config's block (ragged edges allowed: [..., ceil(m/bm), ceil(n/bn)]; 128x128 when the
    config gives none), one scale per output row ([..., m] or [..., m, 1], compressed-tensors channel),
    or one per tensor ([], [1], or [E] / [E, 1] for stacked experts)."""
    if len(w.shape) < 2:
        return None, "FP8 tensor has fewer than 2 dimensions; no scale layout fits it"
    *lead, m, n = w.shape
    blk = cfg_block or (128, 128)
    s_shape = tuple(s.shape)
    if s_shape == scale_grid(w.shape, blk):
        return blk, f"block {blk[0]}x{blk[1]}"
    if s_shape in (tuple(lead) + (m, 1), tuple(lead) + (m,)) and m != 1:
        return (1, n), "channel"
    if math.prod(s_shape) == math.prod(lead) and len(s_shape) <= 1 + len(lead):
        return (m, n), "tensor"
    return None, (
        f"scale shape {list(s.shape)} does not fit weight {list(w.shape)}: expected "
        f"{list(scale_grid(w.shape, blk))} for {blk[0]}x{blk[1]} tiles, {list(lead) + [m, 1]} per row "
        f"or {list(lead) or [1]} per tensor"
    )


def scale_encoding(s: TensorInfo, qc: dict | None) -> str:
    if s.dtype in EXPONENT_DTYPES:
        return f"ue8m0 exponent bytes ({s.dtype})"
    if (qc or {}).get("scale_fmt") == "ue8m0":
        return f"ue8m0 powers of two in {s.dtype}"
    return f"float ({s.dtype})"


# ---------------------------------------------------------------------------------- classification
def artifact_kind(name: str, info: TensorInfo) -> str | None:
    """'activation/kv scale', 'packed' or None: a tensor that only a quantized checkpoint holds."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ARTIFACT_LEAVES:
        return "packed" if leaf in ("weight_packed", "weight_shape") else "activation/kv scale"
    if info.dtype in PACKED_DTYPES and PACKED_RE.search(leaf):
        return "packed"
    return None


def scale_base(name: str, ckpt: Checkpoint, unreadable: dict[str, str]) -> str | None:
    """The tensor `name` is the scale of, if its name says it is a weight scale.

    `X_scale_inv` always is; `X_scale` only when X exists (or should, in an unreadable shard) or
    ends in `.weight`, so that kv-cache / activation scales (`k_scale`, `input_scale`) and model
    parameters such as CLIP's `logit_scale` are not taken for weight scales. DeepSeek-V4's `X.scale`
    and Mistral's `X.qscale_weight` are the scales of `X.weight`."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if suffix == "_scale_inv" or base in ckpt or base in unreadable or base.endswith(".weight"):
                return base
            return None
    for leaf in (".scale", ".qscale_weight"):
        if name.endswith(leaf):
            base = name[: -len(leaf)] + ".weight"
            if base in ckpt or base in unreadable:
                return base
    return None


@dataclass
class Roles:
    fp8: dict[str, TensorInfo] = field(default_factory=dict)  # every FP8 tensor
    scale_names: dict[str, list[str]] = field(default_factory=dict)  # FP8 weight -> its scale(s)
    scales: dict[str, str] = field(default_factory=dict)  # scale -> its weight (FP8 or unreadable)
    orphans: dict[str, str] = field(default_factory=dict)  # scale-like tensor -> why it is an orphan
    artifacts: dict[str, str] = field(default_factory=dict)  # activation/kv scale, packed -> kind
    unquantized: dict[str, None] = field(default_factory=dict)  # float tensors that are none of these
    other: dict[str, None] = field(default_factory=dict)  # integer, bool, ...

    def role(self, name: str) -> str:
        if name in self.fp8:
            return "fp8_weight"
        if name in self.scales or name in self.orphans or name in self.artifacts:
            return "scale"
        if name in self.unquantized:
            return "weight"
        return "other"

    @staticmethod
    def scale_suffix(scale: str) -> str:
        for s in SCALE_SUFFIXES:
            if scale.endswith(s):
                return s
        return "." + scale.rsplit(".", 1)[-1]


def classify(ckpt: Checkpoint, unreadable: dict[str, str] | None = None) -> Roles:
    """Each tensor's role, from names, dtypes and the index alone; O(tensors)."""
    unreadable = unreadable or {}
    roles = Roles()
    for name, shard in ckpt.weight_map.items():
        info = ckpt.shards[shard].tensors[name]
        if info.dtype in FP8_WEIGHT_DTYPES:
            roles.fp8[name] = info
            roles.scale_names[name] = []
    for name, shard in ckpt.weight_map.items():
        if name in roles.fp8:
            continue
        info = ckpt.shards[shard].tensors[name]
        base = scale_base(name, ckpt, unreadable)
        if base is not None:
            if base in roles.fp8:
                roles.scales[name] = base
                roles.scale_names[base].append(name)
            elif base in unreadable:
                roles.scales[name] = base
            elif base in ckpt:
                roles.orphans[name] = f"scale of {base!r}, which is not FP8 ({ckpt.info(base).dtype})"
            else:
                roles.orphans[name] = f"scale without its tensor ({base!r} is not in the checkpoint)"
            continue
        kind = artifact_kind(name, info)
        if kind is not None:
            roles.artifacts[name] = kind
            continue
        (roles.unquantized if info.dtype in FLOAT_DTYPES else roles.other)[name] = None
    return roles


def is_quantized(roles: Roles, config: dict | None) -> bool:
    """FP8 tensors, or packed ones that the config declares: a quantized checkpoint. Packed tensors
    with no quantization settings anywhere are leftovers of one."""
    packed = any(k == "packed" for k in roles.artifacts.values())
    return bool(roles.fp8) or (packed and bool(quantization_config_locations(config)))


# ------------------------------------------------------------------------------------- describing
def describe_format(ckpt: Checkpoint, roles: Roles) -> tuple[str, str]:
    qc = quantization_config(ckpt.config)
    method = quant_method(ckpt)
    float_bytes: dict[str, int] = defaultdict(int)
    for name in roles.unquantized:
        info = ckpt.info(name)
        float_bytes[info.dtype] += info.nbytes
    main = max(float_bytes, key=float_bytes.get) if float_bytes else None
    if roles.fp8:
        if method == "fp8":
            if qc.get("weight_block_size") is None:
                return "fp8", "per-tensor FP8 (quant_method fp8 without weight_block_size, `weight_scale`)"
            return "fp8", "native block FP8 (quant_method fp8, DeepSeek-V3 `weight_scale_inv` layout)"
        if method == "compressed-tensors":
            return "compressed-tensors", "compressed-tensors float-quantized FP8 (`weight_scale` layout)"
        if qc is None:
            return "fp8-unconfigured", "FP8 tensors but no quantization_config in config.json"
        return "fp8-other", f"FP8 tensors with quant_method {method!r}"
    if is_quantized(roles, ckpt.config):
        return "packed-other", f"packed quantized tensors (quant_method {method!r})"
    plain = f"plain {main.lower()}" if main else "no floating-point tensors"
    if quantization_config_locations(ckpt.config):
        return "plain-with-quantization-config", f"{plain}, but config.json keeps quantization settings"
    return "plain", plain
