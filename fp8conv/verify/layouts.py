"""Layout knowledge verify and inspect need, in one place: which tensor is an FP8 weight, which its
scale and how that scale broadcasts, which tensors and config keys are quantization artifacts.

This is verify's adapter over `fp8conv/formats/` (one module per layout family): nothing else under
`fp8conv/verify/` branches on a quantization method, a scale suffix or an artifact name. `classify` asks
`formats.detect` first; a checkpoint that detect refuses (a missing or misshapen scale, an orphan scale:
exactly what verify exists to report tensor by tensor) is classified by names with the same rules
(formats' scale names and artifact patterns), so each problem can still be named. What loaders want
beyond what a layout allows (the scale name each method's loader looks for, skip lists) is here too.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from fp8conv import formats as F
from fp8conv.checkpoint.layout import Checkpoint
from fp8conv.checkpoint.safetensors_io import FLOAT_DTYPES, FP8_WEIGHT_DTYPES, TensorInfo
from fp8conv.errors import InvalidCheckpoint
from fp8conv.formats.base import ACTIVATION_ARTIFACTS, SCALE_LIKE

SCALE_SUFFIXES = ("_scale_inv", "_scale")
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")
EXPONENT_DTYPES = ("F8_E8M0", "U8")  # scale bytes that are biased power-of-two exponents
PACKED_DTYPES = ("U8", "I8", "I32")

# Packed FP4 blocks and their exponent scales (gpt-oss MXFP4: `..._blocks` U8, `..._scales` U8).
PACKED_RE = re.compile(r"_(blocks|scales)$")

# Name fragments of embedding tables: 2-D float `.weight`s that are not Linear layers.
EMBED_HINTS = ("embed", "wte", "wpe")

# quantization_config `fmt` spellings (MiniMax-M2 writes torch's dtype name)
FP8_FMTS = {"e4m3": "F8_E4M3", "float8_e4m3fn": "F8_E4M3", "e5m2": "F8_E5M2", "float8_e5m2": "F8_E5M2"}
SIDE_FILES = {F.HF_QUANT_CONFIG: "ModelOpt quantization settings (vLLM reads them)"}
PARAMS_FILE = F.PARAMS_JSON  # Mistral native: a "quantization" key


# --------------------------------------------------------------------------------------- config
def quantization_config(config: dict | None) -> dict | None:
    return F.find_quantization_config(config)


def quantization_config_locations(config: dict | None) -> list[str]:
    """Every place of config.json that holds quantization settings (a dequantized output keeps none)."""
    return F.config_locations(config)


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
        return FP8_FMTS.get(fmt)
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


def naming_problem(qc: dict | None, scale: str) -> str | None:
    """The loader-facing clash of a scale's name with its method, or None: a `_scale` beside block fp8
    (vLLM's fp8 loader wants `weight_scale_inv`), a `_scale_inv` under compressed-tensors (it wants
    `weight_scale`). Family-specific names (DeepSeek-V4 `.scale`, Mistral `qscale_weight`) and
    `_scale_inv` on per-tensor fp8 (transformers' static fused experts) are what those releases ship."""
    want = expected_scale_suffix(qc)
    method = (qc or {}).get("quant_method")
    if want == "_scale_inv" and scale.endswith("_scale"):
        return "_scale"
    if method == "compressed-tensors" and scale.endswith("_scale_inv"):
        return "_scale_inv"
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
@dataclass(frozen=True)
class ScaleUse:
    """How one FP8 weight's scale spreads: the tile one scale covers, the stored scale's `view` and the
    tile grid it broadcasts to ([*lead, ceil(M/bm), ceil(N/bn)]), and the scheme in words."""

    tile: tuple[int, int]
    scale: TensorInfo
    scheme: str  # "block 128x128", "channel", "tensor", "expert", "column", "half", ...
    view: tuple[int, ...]
    grid: tuple[int, ...]

    @property
    def one_per_matrix(self) -> bool:
        """One scale per tensor or per expert: the same value over every tile of a matrix."""
        return self.scheme in ("tensor", "expert")


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, math.ceil(m / block[0]), math.ceil(n / block[1]))


def _scheme_name(layout: F.ScaleLayout) -> str:
    g = layout.granularity
    if g in (F.Granularity.BLOCK, F.Granularity.GROUP):
        return f"{g.value} {layout.tile[0]}x{layout.tile[1]}"
    return g.value


def scale_use(roles: Roles, w: TensorInfo, s: TensorInfo, cfg_block: tuple[int, int] | None):
    """(ScaleUse, None) for weight w with scale s, or (None, why-not).

    From the layout family's own reading when formats.detect explained the checkpoint; else the
    granularities every FP8 family shares (tiles of the config's block, 128x128 when it gives none,
    ragged edges allowed; one scale per row; per tensor or per expert), through formats' fit_scale."""
    if len(w.shape) < 2:
        return None, "FP8 tensor has fewer than 2 dimensions; no scale layout fits it"
    qw = roles.detection.weights.get(w.name) if roles.detection is not None else None
    if qw is not None and qw.scale.name == s.name:
        lay = qw.layout
        return ScaleUse(lay.tile, s, _scheme_name(lay), lay.view, lay.grid), None
    enc = F.scheme.SCALE_ENCODINGS.get(s.dtype)
    blk = cfg_block or (128, 128)
    if enc is not None:
        allowed = frozenset(
            {F.Granularity.BLOCK, F.Granularity.TENSOR, F.Granularity.EXPERT, F.Granularity.CHANNEL}
        )
        lay = F.scheme.fit_scale(tuple(w.shape), tuple(s.shape), enc, allowed, blk)
        if lay is not None:
            return ScaleUse(lay.tile, s, _scheme_name(lay), lay.view, lay.grid), None
    *lead, m, n = w.shape
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
    """The kind of a tensor only a quantized checkpoint holds (activation / kv-cache scales by
    formats' patterns, packed FP4 companions), or None."""
    for pat, kind in ACTIVATION_ARTIFACTS:
        if pat.search(name):
            return kind.value
    if info.dtype in ("U8", "I8") and PACKED_RE.search(name):
        return "packed"
    if info.dtype in ("U8", "I8", "I32") and name.endswith(("weight_packed", "weight_shape")):
        return "packed"
    return None


def scale_base(name: str, ckpt: Checkpoint, unreadable: dict[str, str]) -> str | None:
    """The tensor `name` is the scale of, if its name says it is a weight scale (the names of
    formats' fp8 family: `X_scale_inv`, `X_scale`, DeepSeek-V4's `X.scale` for `X.weight`; and
    Mistral's `X.qscale_weight`).

    `X_scale` counts only when X exists (or should, in an unreadable shard) or ends in `.weight`, so
    that kv-cache / activation scales and model parameters such as CLIP's `logit_scale` are not taken
    for weight scales."""
    if name.endswith("_scale_inv"):
        return name[: -len("_scale_inv")]
    if name.endswith("_scale"):
        base = name[: -len("_scale")]
        if base in ckpt or base in unreadable or base.endswith(".weight"):
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
    packed: dict[str, TensorInfo] = field(default_factory=dict)  # packed FP4 codes formats explains
    unquantized: dict[str, None] = field(default_factory=dict)  # float tensors that are none of these
    other: dict[str, None] = field(default_factory=dict)  # integer, bool, ...
    detection: F.Detection | None = None  # formats.detect's reading, when it explained the folder
    detect_error: InvalidCheckpoint | None = None  # what it refused, otherwise

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

    @property
    def family(self) -> str | None:
        return self.detection.family if self.detection is not None else None


def _from_detection(ckpt: Checkpoint, found: F.Detection) -> Roles:
    roles = Roles(detection=found)
    for name, qw in found.weights.items():
        if qw.element.packed:
            roles.packed[name] = qw.codes
        else:
            roles.fp8[name] = qw.codes
            roles.scale_names[name] = [qw.scale.name]
    for name, a in found.artifacts.items():
        if a.kind is F.ArtifactKind.WEIGHT_SCALE:
            if a.of in roles.fp8:
                roles.scales[name] = a.of
            else:
                roles.artifacts[name] = "packed"  # the e8m0 scales of packed FP4 codes
        else:
            roles.artifacts[name] = a.kind.value
    for name in roles.packed:
        roles.artifacts[name] = "packed"
    for name, shard in ckpt.weight_map.items():
        if name in roles.fp8 or name in roles.scales or name in roles.artifacts:
            continue
        info = ckpt.shards[shard].tensors[name]
        (roles.unquantized if info.dtype in FLOAT_DTYPES else roles.other)[name] = None
    return roles


def classify(ckpt: Checkpoint, unreadable: dict[str, str] | None = None) -> Roles:
    """Each tensor's role; O(tensors). formats.detect's reading when it explains the checkpoint (and no
    shard is unreadable); otherwise by names, dtypes and the index (see the module docstring)."""
    unreadable = unreadable or {}
    error = None
    if not unreadable:
        try:
            return _from_detection(ckpt, F.detect(ckpt))
        except InvalidCheckpoint as e:
            error = e
    roles = Roles(detect_error=error)
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
        if info.dtype == "F8_E8M0" or SCALE_LIKE.search(name):
            roles.orphans[name] = (
                f"{info.dtype} tensor named like part of a quantization that no layout explains"
            )
            continue
        (roles.unquantized if info.dtype in FLOAT_DTYPES else roles.other)[name] = None
    return roles


def is_quantized(roles: Roles, config: dict | None) -> bool:
    """FP8 tensors, or packed ones that a layout family explains: a quantized checkpoint. Packed
    tensors no family explains are leftovers."""
    return bool(roles.fp8) or bool(roles.packed)


def leftovers(ckpt: Checkpoint, params: dict | None) -> list:
    """formats' list of what a dequantized output must not hold (tensors, config keys, side files)."""
    tensors = {n: (ckpt.info(n).dtype, s) for n, s in ckpt.weight_map.items()}
    return F.dequantized_leftovers(tensors, ckpt.config, ckpt.other_files, params)


# ------------------------------------------------------------------------------------- describing
def describe_format(ckpt: Checkpoint, roles: Roles) -> tuple[str, str]:
    qc = quantization_config(ckpt.config)
    method = quant_method(ckpt)
    float_bytes: dict[str, int] = defaultdict(int)
    for name in roles.unquantized:
        info = ckpt.info(name)
        float_bytes[info.dtype] += info.nbytes
    main = max(float_bytes, key=float_bytes.get) if float_bytes else None
    quantized = is_quantized(roles, ckpt.config)
    found = roles.detection
    if quantized and found is not None and found.settings.quantized:
        schemes = ", ".join(s.describe() for s in found.schemes)
        names = sorted({n.rsplit(".", 1)[-1] for n in roles.scales})
        named = f"; scales named `{'`, `'.join(names[:3])}`" if names else ""
        return found.family, f"{found.title}: {schemes}{named}"
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
    plain = f"plain {main.lower()}" if main else "no floating-point tensors"
    if quantization_config_locations(ckpt.config):
        return "plain-with-quantization-config", f"{plain}, but config.json keeps quantization settings"
    return "plain", plain
