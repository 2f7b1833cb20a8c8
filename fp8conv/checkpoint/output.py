"""The output folder: path safety, atomic files, and the resume state that makes reruns cheap.

State lives in DST/.fp8conv/:
  job.json          what this output is being made from (command, options, source files' sizes and
                    mtimes); a rerun with anything different is refused (exit 6) and told what differs
  done/<file>.json  one record per finished output file (size, mtime); written after the rename
  tmp/              files being written; moved to their final names only when complete
  complete          written last; a rerun that finds it (and a matching job) exits at once
Every file reaches its final name by rename(2) from tmp/, so no half-written file ever sits under a
final name, whatever kills the process.

Environment:
  FP8CONV_WRITEBACK=0  turns off the early-writeback hint (start_writeback: sync_file_range every
                       ~64 MiB written to a shard's temporary file), for A/B benchmarks; read at
                       each call. Durability does not depend on it: every file is fsynced before
                       its rename either way.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
from pathlib import Path

from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.errors import ResourceError, UnsafePathError

JOB_FILE = "job.json"
COMPLETE_FILE = "complete"


def io_error(e: OSError, path: Path | str, what: str, tensor: str | None = None) -> ResourceError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        rule = f"{what} failed: {e.strerror} (free space, then rerun the same command to resume)"
    else:
        rule = f"{what} failed: {e.strerror or e}"
    return ResourceError(rule, file=path, tensor=tensor)


def _same_or_inside(a: Path, b: Path) -> bool:
    """True when a is b or lies inside b (both resolved)."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_paths(src: Path, dst: Path) -> None:
    """Refuse (exit 6) a DST that is SRC, lies inside it, contains it, or reaches it through links."""
    rs, rd = src.resolve(), dst.resolve()
    if rs == rd:
        raise UnsafePathError(
            "DST is the same folder as SRC",
            file=dst,
            hint="choose a new output folder; the source is never modified",
        )
    if _same_or_inside(rd, rs):
        raise UnsafePathError("DST lies inside SRC", file=dst, hint="choose a folder outside SRC")
    if _same_or_inside(rs, rd):
        raise UnsafePathError("DST contains SRC", file=dst, hint="choose a folder beside SRC")
    if dst.is_symlink():
        raise UnsafePathError("DST is a symlink; nothing is written through links", file=dst)
    if dst.exists() and not dst.is_dir():
        raise UnsafePathError("DST exists and is not a folder", file=dst)


class OutputDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.tmp = self.state / "tmp"
        self.done_dir = self.state / "done"

    # ---- job identity -------------------------------------------------------------------------
    def read_job(self) -> dict | None:
        """The job DST was started for; None if there is none, {} if it cannot be read."""
        if not self.root.is_dir():
            return None
        try:
            job = json.loads((self.state / JOB_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return job if isinstance(job, dict) else {}

    def is_complete(self, job: dict, files: list[str] = ()) -> bool:
        """Marked complete for `job`, and each of `files` still as it was recorded (stat only)."""
        try:
            if json.loads((self.state / COMPLETE_FILE).read_text()) != job:
                return False
        except (OSError, ValueError):
            return False
        return all(self.is_done(rel) for rel in files)

    def prepare(self, job: dict, overwrite: bool) -> None:
        """Create or adopt DST for `job`; refuse foreign content unless overwrite; clear tmp/."""
        existing = self.read_job()
        has_content = self._has_content()
        linked = [d for d in (self.state, self.tmp, self.done_dir) if d.is_symlink()]
        if linked and not overwrite:
            raise UnsafePathError(
                "state folder is a symlink; nothing is written through links",
                file=linked[0],
                hint="remove it, or pass --overwrite to start over",
            )
        if existing == {} and not overwrite:
            raise UnsafePathError(
                f"DST holds fp8conv state that cannot be read ({STATE_DIR}/{JOB_FILE})",
                file=self.root,
                hint="pass --overwrite to start over",
            )
        if existing is not None and existing != job and not overwrite:
            raise UnsafePathError(
                "DST holds an unfinished or finished conversion started with different settings: "
                + describe_difference(existing, job),
                file=self.root,
                hint="use a new DST, rerun with the original settings, or pass --overwrite",
            )
        if existing is None and has_content and not overwrite:
            raise UnsafePathError(
                "DST exists and holds other content",
                file=self.root,
                hint="choose an empty or new folder, or pass --overwrite to replace its content",
            )
        links = [] if overwrite else self._links()
        if links:
            raise UnsafePathError(
                f"DST holds {len(links)} symlink(s) ({', '.join(map(str, links[:3]))}); fp8conv "
                "makes none and writes nothing through links",
                file=self.root,
                hint="remove them, or pass --overwrite to replace them with real files",
            )
        if overwrite and ((existing != job and has_content) or linked):
            self.clear()
            existing = None
        elif overwrite:
            self._drop_links()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in (self.state, self.tmp, self.done_dir):
                if d.is_symlink():
                    raise UnsafePathError("state folder is a symlink", file=d)
                d.mkdir(exist_ok=True)
            for leftover in self.tmp.iterdir():
                if _stale(leftover.name):
                    _remove(leftover)
            if existing != job:
                self.write_json_atomic(self.state / JOB_FILE, job)
        except OSError as e:
            raise io_error(e, self.root, "preparing the output folder") from e

    def _links(self) -> list[Path]:
        """Symlinks anywhere in DST (not followed), relative to it."""
        found: list[Path] = []
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    found.append(p.relative_to(self.root))
        return found

    def _drop_links(self) -> None:
        """--overwrite on a resumable DST: remove its symlinks (fp8conv never makes any), so that
        files and folders are made anew there."""
        try:
            for rel in self._links():
                (self.root / rel).unlink()
        except OSError as e:
            raise io_error(e, self.root, "removing links from the output folder (--overwrite)") from e

    def _has_content(self) -> bool:
        """Anything besides a state folder without job.json (what a kill during prepare leaves)."""
        try:
            return self.root.is_dir() and any(c.name != STATE_DIR for c in self.root.iterdir())
        except OSError as e:
            raise io_error(e, self.root, "listing the output folder") from e

    def clear(self) -> None:
        try:
            for child in self.root.iterdir():
                _remove(child)
        except OSError as e:
            raise io_error(e, self.root, "clearing the output folder (--overwrite)") from e

    # ---- per-file records ---------------------------------------------------------------------
    def _record(self, rel: str) -> Path:
        return self.done_dir / (rel.replace("%", "%25").replace("/", "%2F") + ".json")

    def is_done(self, rel: str) -> bool:
        """A finished file: recorded, and still the same size and mtime as when it was recorded."""
        try:
            rec = json.loads(self._record(rel).read_text())
            st = (self.root / rel).lstat()
        except (OSError, ValueError):
            return False
        return rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def mark_done(self, rel: str) -> None:
        st = (self.root / rel).lstat()
        self.write_json_atomic(self._record(rel), {"size": st.st_size, "mtime_ns": st.st_mtime_ns})

    def mark_complete(self, job: dict) -> None:
        self.write_json_atomic(self.state / COMPLETE_FILE, job)

    # ---- atomic files -------------------------------------------------------------------------
    def tmp_path(self, rel: str) -> Path:
        return self.tmp / f"{rel.replace('/', '%2F')}.{_TOKEN}"

    def commit(self, tmp: Path, rel: str) -> None:
        """fsync tmp, rename it to DST/rel (replacing a link there, never following one)."""
        final = self.root / rel
        try:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.ensure_parent(rel)
            os.replace(tmp, final)
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise io_error(e, final, "committing the file") from e

    def ensure_parent(self, rel: str) -> None:
        parent = self.root
        for part in Path(rel).parts[:-1]:
            parent = parent / part
            if parent.is_symlink():
                raise UnsafePathError(
                    "folder in DST is a symlink; nothing is written through links", file=parent
                )
            parent.mkdir(exist_ok=True)

    def open_tmp(self, rel: str) -> tuple[int, Path]:
        tmp = self.tmp_path(rel)
        try:
            if tmp.exists() or tmp.is_symlink():
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise io_error(e, tmp, "creating a temporary file") from e
        return fd, tmp

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        fd, tmp = self.open_tmp(rel)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self.commit(tmp, rel)
        except OSError as e:
            _remove(tmp)
            raise io_error(e, self.root / rel, "writing") from e
        except BaseException:
            _remove(tmp)
            raise

    def write_json_atomic(self, path: Path, obj: object) -> None:
        """State record via a fresh temporary file (never through a link planted there), renamed."""
        tmp = path.with_name(f"{path.name}.{_TOKEN}.tmp")
        data = json.dumps(obj, sort_keys=True).encode()
        try:
            _remove(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            _remove(tmp)
            raise io_error(e, path, "recording progress") from e

    def copy_file(self, src: Path, rel: str) -> None:
        """Copy SRC file content (through source links) to DST/rel atomically."""
        fd, tmp = self.open_tmp(rel)
        try:
            try:
                with open(src, "rb") as fin:
                    copy_range(fin.fileno(), fd, 0, os.fstat(fin.fileno()).st_size, 0)
                shutil.copymode(src, tmp)
            finally:
                os.close(fd)
            self.commit(tmp, rel)
        except OSError as e:
            _remove(tmp)
            raise io_error(e, self.root / rel, "copying " + str(src)) from e
        except BaseException:
            _remove(tmp)
            raise


# Temporary names carry host and process, so parts running at once into one shared DST (--part)
# never write or remove each other's files; a rerun removes only leftovers of dead processes here.
_HOST = socket.gethostname().replace(".", "_") or "host"
_TOKEN = f"{_HOST}.{os.getpid()}"


def _stale(name: str) -> bool:
    """A temporary file left by a process of this host that no longer runs (or of unknown origin)."""
    parts = name.rsplit(".", 2)
    if len(parts) < 3 or not parts[2].isdigit():
        return True
    host, pid = parts[1], int(parts[2])
    if host != _HOST:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def copy_range(fd_in: int, fd_out: int, off_in: int, length: int, off_out: int) -> None:
    """Copy bytes between files in the kernel where it can (copy_file_range), else through a buffer."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < length:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(
                    fd_in, fd_out, min(length - done, 1 << 30), off_in + done, off_out + done
                )
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    use_cfr = False
                    continue
                raise
        else:
            chunk = os.pread(fd_in, min(length - done, 16 << 20), off_in + done)
            if chunk:
                view = memoryview(chunk)
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(fd_out, view[pos:], off_out + done + pos)
                n = len(chunk)
        if n == 0:
            raise OSError(errno.EIO, "source ended early (file shrank while being read)")
        done += n


# sync_file_range(2) is hand-written here through ctypes: Python's os module has no wrapper for it and
# no library we could depend on exposes it. Resolved once; None where libc lacks it (not Linux).
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it
WRITEBACK_CHUNK = 64 << 20  # the shard writer hints after about this many bytes written


def _resolve_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)  # fd, off64_t x2, flags
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _resolve_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing bytes [offset, offset+length) of fd to disk now, without
    waiting, so the disk works while conversion goes on instead of idling until the fsync before the
    rename. Only a hint: True when it was given; where the call is missing or fails (EINVAL, ENOSYS,
    ESPIPE, ...), it is silently dropped for the rest of the process. FP8CONV_WRITEBACK=0 turns it off."""
    global _sync_file_range
    fn = _sync_file_range
    if fn is None or length <= 0 or os.environ.get("FP8CONV_WRITEBACK", "1") == "0":
        return False
    try:
        ok = fn(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0
    except (OSError, ctypes.ArgumentError):
        ok = False
    if not ok:
        _sync_file_range = None
    return ok


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


def describe_difference(old: dict, new: dict, prefix: str = "") -> str:
    diffs: list[str] = []

    def walk(a: object, b: object, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k)
        elif a != b and path.startswith("source."):
            # A source file's [size, hash] pair means nothing to a reader; say what happened to it.
            name = path[len("source.") :]
            if a == "<absent>":
                diffs.append(f"SRC has a new file {name}")
            elif b == "<absent>":
                diffs.append(f"{name} is no longer in SRC")
            else:
                diffs.append(f"{name} changed since this output was started")
        elif a != b:
            diffs.append(f"{path}: was {a!r}, now {b!r}")

    walk(old, new, prefix)
    shown = "; ".join(diffs[:5])
    return shown + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "") or "unreadable state"
