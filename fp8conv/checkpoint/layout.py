"""A checkpoint folder: its shards, index, config and other files, validated before any output exists."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fp8conv.checkpoint.safetensors_io import ShardHeader, TensorInfo, read_header
from fp8conv.errors import InvalidCheckpoint, ResourceError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Mistral's native tensors, shipped beside the HF shards or alone (vLLM `--load-format mistral` reads it);
# the HF index never names it.
NATIVE_NAME = "consolidated.safetensors"
CONFIG_NAME = "config.json"
STATE_DIR = ".fp8conv"  # resume state inside an output folder; never copied from a source


@dataclass
class Checkpoint:
    """The validated shape of a checkpoint folder. Tensor data is read later, piece by piece."""

    root: Path
    shards: dict[str, ShardHeader]  # shard file name -> header, in name order
    weight_map: dict[str, str]  # tensor name -> shard file name
    has_index: bool
    index_metadata: dict = field(default_factory=dict)
    config: dict | None = None
    other_files: list[str] = field(default_factory=list)  # relative paths, copied as they are
    unindexed: tuple[str, ...] = ()  # shards the index does not list (Mistral's consolidated.safetensors)

    def info(self, name: str) -> TensorInfo:
        return self.shards[self.weight_map[name]].tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.shards.values())


def load_json(path: Path, what: str) -> object:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ResourceError(f"cannot read {what}: {e.strerror or e}", file=path) from e
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too deep, too-long integers
        raise InvalidCheckpoint(f"{what} is not valid JSON ({e})", file=path) from None


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, links followed, stays in the checkpoint. A Hugging Face cache snapshot
    (`<repo>/snapshots/<rev>/`) is made of links into `<repo>/blobs/`: that folder counts as inside."""
    target = path.resolve()
    allowed = [root.resolve()]
    if allowed[0].parent.name == "snapshots":
        allowed.append(allowed[0].parent.parent / "blobs")
    for a in allowed:
        try:
            target.relative_to(a)
            return True
        except ValueError:
            pass
    return False


def check_shard_name(root: Path, index_path: Path, name: object, tensor: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidCheckpoint("weight_map value must be a shard file name", file=index_path, tensor=tensor)
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or len(p.parts) != 1:
        raise InvalidCheckpoint(
            f"shard {name!r} is not a plain file name inside the checkpoint folder "
            "(absolute paths, '..' and sub-folders are refused)",
            file=index_path,
            tensor=tensor,
        )
    if not name.endswith(".safetensors"):
        raise InvalidCheckpoint(f"shard {name!r} is not a .safetensors file", file=index_path, tensor=tensor)
    full = root / name
    if full.is_symlink() and not _inside(root, full):
        raise InvalidCheckpoint(
            f"shard {name!r} is a symlink that leads outside the checkpoint folder",
            file=index_path,
            tensor=tensor,
        )


def index_disagreements(root: Path, weight_map: dict[str, str], shards: dict[str, ShardHeader]):
    """Each place where the index and the shard headers disagree, as an InvalidCheckpoint, in a fixed
    order: tensors the index places in a shard that lacks them, then tensors a shard holds that the
    index puts elsewhere or nowhere. Shards missing from `shards` (unreadable) are skipped."""
    index_path = root / INDEX_NAME
    for tensor, shard in weight_map.items():
        if shard in shards and tensor not in shards[shard].tensors:
            yield InvalidCheckpoint(
                f"the index places this tensor in {shard}, but that shard does not hold it",
                file=index_path,
                tensor=tensor,
            )
    for shard, header in shards.items():
        for tensor in header.tensors:
            placed = weight_map.get(tensor)
            if placed != shard:
                rule = (
                    "tensor is in this shard but missing from the index"
                    if placed is None
                    else f"tensor is present in two shards (the index says {placed})"
                )
                yield InvalidCheckpoint(rule, file=root / shard, tensor=tensor)


def open_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """Read every header and the index, check that they agree; raise InvalidCheckpoint if not."""
    root = Path(src)
    if not root.exists():
        raise InvalidCheckpoint("checkpoint folder does not exist", file=root)
    if root.is_file():
        raise InvalidCheckpoint(
            "expected a folder holding model.safetensors or model.safetensors.index.json", file=root
        )
    index_path = root / INDEX_NAME
    if index_path.exists():
        index = load_json(index_path, "index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise InvalidCheckpoint("index has no weight_map object", file=index_path)
        weight_map: dict[str, str] = index["weight_map"]
        metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        for tensor, shard in weight_map.items():
            check_shard_name(root, index_path, shard, tensor)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise InvalidCheckpoint(
                f"{len(missing)} shard(s) named by the index are missing: {', '.join(missing)}",
                file=index_path,
            )
        shards = {n: read_header(root / n) for n in names}
        for problem in index_disagreements(root, weight_map, shards):
            raise problem
        has_index = True
    elif (root / SINGLE_NAME).is_file():
        header = read_header(root / SINGLE_NAME)
        shards = {SINGLE_NAME: header}
        weight_map = {t: SINGLE_NAME for t in header.tensors}
        metadata = {}
        has_index = False
    elif (root / NATIVE_NAME).is_file():
        shards, weight_map, metadata, has_index = {}, {}, {}, False
    else:
        raise InvalidCheckpoint(
            f"no {INDEX_NAME} or {SINGLE_NAME} in the folder (nor Mistral's {NATIVE_NAME})",
            file=root,
        )
    unindexed: tuple[str, ...] = ()
    if (root / NATIVE_NAME).is_file() and NATIVE_NAME not in shards:
        header = read_header(root / NATIVE_NAME)
        for tensor in header.tensors:
            if tensor in weight_map:
                raise InvalidCheckpoint(
                    f"tensor is also in {weight_map[tensor]}; names of the native and HF tensors must differ",
                    file=root / NATIVE_NAME,
                    tensor=tensor,
                )
            weight_map[tensor] = NATIVE_NAME
        shards[NATIVE_NAME] = header
        unindexed = (NATIVE_NAME,)
    config = None
    if (root / CONFIG_NAME).is_file():
        config = load_json(root / CONFIG_NAME, "config")
        if not isinstance(config, dict):
            raise InvalidCheckpoint("config.json is not a JSON object", file=root / CONFIG_NAME)
    return Checkpoint(
        root=root,
        shards=shards,
        weight_map=weight_map,
        has_index=has_index,
        index_metadata=metadata,
        config=config,
        other_files=list_other_files(root, set(shards)),
        unindexed=unindexed,
    )


def list_other_files(root: Path, shard_names: set[str]) -> list[str]:
    """Every file to copy as it is: all but shards, the index, config.json and fp8conv's state."""
    out: list[str] = []
    skip_top = shard_names | {INDEX_NAME, CONFIG_NAME, STATE_DIR}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_top)
        else:
            dirnames.sort()
        for d in list(dirnames):
            if (Path(dirpath) / d).is_symlink() and not _inside(root, Path(dirpath) / d):
                raise InvalidCheckpoint(
                    "symlinked folder leads outside the checkpoint folder", file=Path(dirpath) / d
                )
        for fn in sorted(filenames):
            rel = rel_dir / fn
            if rel_dir == Path(".") and fn in skip_top:
                continue
            if rel_dir == Path(".") and fn.endswith(".safetensors"):
                raise InvalidCheckpoint(
                    "safetensors file is not named by the index (stray or leftover shard)",
                    file=root / fn,
                )
            full = root / rel
            if full.is_symlink() and not _inside(root, full):
                raise InvalidCheckpoint("symlink leads outside the checkpoint folder", file=full)
            if not full.is_file():  # a FIFO would block the copy; a dangling link fail it at the end
                raise InvalidCheckpoint(
                    "not a regular file (FIFO, socket, device or dangling symlink); only regular "
                    "files are copied to the output",
                    file=full,
                )
            out.append(str(rel))
    return out
