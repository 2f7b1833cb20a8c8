"""Where a checkpoint comes from: a local folder, a Hugging Face cache snapshot, or a repo id.

`resolve_source` is the one place that turns what a user typed into a local folder; `open_checkpoint`
calls it, so every command and the Python API accept the same things:

- a folder (a Hugging Face cache snapshot `.../snapshots/<commit>/` is a folder too);
- a repo id `org/name`, `org/name@revision`, or `org/name` with `revision=`: resolved through
  huggingface_hub's `snapshot_download`, which honours `HF_HUB_OFFLINE`, `HF_HOME` and
  `HF_HUB_CACHE`, returns the cached snapshot when it is there and, online, downloads only what a
  conversion uses (safetensors shards, JSON, tokenizer and other small files; never other weight
  formats such as `*.bin` or `original/`, which would otherwise be copied into the output).

A path that exists locally always wins over a repo id of the same spelling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fp8conv.errors import InvalidCheckpoint, ResourceError, UsageError

# Other weight formats a model repo may ship beside its safetensors; never needed by a conversion,
# and copying them into an FP8 output would publish the full-precision weights a second time.
IGNORE_PATTERNS = [
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
    "*.tflite",
    "*.ot",
    "*.mlmodel",
    "original/*",
    ".gitattributes",
]

# huggingface_hub's repo id rule (validate_repo_id), with an optional @revision.
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^\s@]+))?")


@dataclass(frozen=True)
class RepoRef:
    """A Hugging Face model repo and revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        """The repo's own name, `DeepSeek-V3` for `deepseek-ai/DeepSeek-V3`."""
        return self.repo_id.split("/", 1)[1]


def parse_repo_id(src: str | os.PathLike, revision: str | None = None) -> RepoRef | None:
    """The repo a source names, or None when it is (or can only be) a local path.

    A path that exists, or that starts with `.`, `/` or `~`, or has more than one `/`, is a path.
    """
    text = os.fspath(src)
    if Path(text).exists() or text.startswith((".", "/", "~")) or text.endswith("/"):
        return None
    m = _REPO_ID.fullmatch(text)
    if not m or ".." in m.group("repo") or m.group("repo").endswith((".git", ".")):
        return None
    rev = m.group("rev")
    if rev and revision and rev != revision:
        raise UsageError(f"{text}: revision given twice ({rev!r} and --revision {revision!r})")
    return RepoRef(m.group("repo"), rev or revision)


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for `src` (a folder, a cache snapshot or a repo id); see the module docstring.

    Raises InvalidCheckpoint (exit 3) for a repo that is not in the cache while offline, not on the
    Hub, or a revision that does not exist; ResourceError (exit 5) when the Hub cannot be reached.
    """
    ref = parse_repo_id(src, revision)
    if ref is None:
        if revision is not None:
            raise UsageError(f"{os.fspath(src)}: --revision applies to a Hugging Face repo id, not a folder")
        if not Path(src).exists():
            raise InvalidCheckpoint(
                "checkpoint folder does not exist (nor is it a Hugging Face repo id, org/name)",
                file=src,
                hint="check the path; `ls` the parent folder",
            )
        return Path(src)
    return Path(_snapshot(ref))


def _snapshot(ref: RepoRef) -> str:
    # huggingface_hub reads HF_HUB_OFFLINE and the cache location when it is imported, so it is
    # imported here (after the caller's environment is set), not at module import.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"Hugging Face repo {ref}"
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return snapshot_download(ref.repo_id, revision=ref.revision, ignore_patterns=IGNORE_PATTERNS)
    except GatedRepoError:
        raise InvalidCheckpoint(
            "the repo is gated and this machine has no access",
            file=where,
            hint="accept its terms on huggingface.co, then `hf auth login` or set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise InvalidCheckpoint(
            "no such model repo on the Hub (or it is private)",
            file=where,
            hint="check the spelling, or log in with `hf auth login` for a private repo",
        ) from None
    except RevisionNotFoundError:
        raise InvalidCheckpoint(
            f"the repo has no revision {ref.revision!r}",
            file=where,
            hint="give a branch, tag or commit that exists",
        ) from None
    except IncompleteSnapshotError:
        raise InvalidCheckpoint(
            f"the cached copy in {constants.HF_HUB_CACHE} is incomplete",
            file=where,
            hint=f"finish the download online: `hf download {ref.repo_id}`",
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise InvalidCheckpoint(
                f"not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set",
                file=where,
                hint=f"download it first (`hf download {ref}`), point HF_HUB_CACHE at the cache that "
                "holds it, or unset HF_HUB_OFFLINE",
            ) from None
        raise ResourceError(
            f"the Hub cannot be reached and the repo is not in the cache ({constants.HF_HUB_CACHE})",
            file=where,
            hint="check the network, or give a local folder",
        ) from None
    except HfHubHTTPError as e:
        raise ResourceError(
            f"download failed: {e}", file=where, hint="run the same command again to resume"
        ) from None
    except OSError as e:
        raise ResourceError(
            f"cannot write the Hugging Face cache: {e.strerror or e}",
            file=where,
            hint="free space or set HF_HUB_CACHE to a writable folder",
        ) from None
