"""The output folder: path safety, atomic files, the lock, and the checks that make reruns safe and cheap.

While a run is unfinished its state lives in one hidden folder, DST/.fp8conv/:
  job.json           what this output is being made from (command, options, source files' sizes and
                     content hashes); a rerun with anything different is refused (exit 6) and told what
  owner              the job that holds DST (see FolderLock); made by link(2), so exactly one wins
  part-I-of-N        one per running part of that job (I/N, 1/1 without --part), made the same way
  holders/<token>    one per running process: who it is, and a heartbeat (its mtime)
  tmp/<file>.<token> files being written; renamed to their final names only when complete
After a successful run the state folder is removed: DST holds the model and nothing else. What a
rerun needs to trust a finished output is inside the files themselves: every shard's safetensors
`__metadata__` carries the job (`fp8conv.job`) and a checksum of the shard's content
(`fp8conv.checksum`, computed while it was written); side files are compared with the source, the
index and config.json with what would be written. Every file reaches its final name by rename(2),
so no half-written file ever sits under a final name, whatever kills the process. Temporary names
carry a random token per process, never host name or PID (containers share both).

Environment:
  FP8CONV_WRITEBACK=0  turns off the early-writeback hint (start_writeback: sync_file_range every
                       ~64 MiB written to a shard's temporary file), for A/B benchmarks; read at
                       each call. Durability does not depend on it: every file is fsynced before
                       its rename either way.
  FP8CONV_LOCK_LEASE   seconds without a heartbeat after which a holder on another machine or in
                       another PID namespace counts as dead (default 60; heartbeats every lease/6).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
import zlib
from pathlib import Path

from fp8conv.checkpoint.layout import STATE_DIR
from fp8conv.errors import ResourceError, UnsafePathError

JOB_FILE = "job.json"
OWNER_FILE = "owner"
HOLDERS = "holders"
META_JOB = "fp8conv.job"  # in each output shard's __metadata__: the job, as canonical JSON
META_HASH = "fp8conv.checksum"  # ... and the shard's content checksum (see shard_digest)
HASH_PLACEHOLDER = "0" * 64  # the hash's value while the shard is written; same length as the hash
# One random token per process names its temporary files and its holder record. Host name and PID
# are not unique across containers (each may be PID 1 on the same host name) or PID namespaces.
TOKEN = secrets.token_hex(8)


def io_error(e: OSError, path: Path | str, what: str, tensor: str | None = None) -> ResourceError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        rule = f"{what} failed: {e.strerror} (free space, then rerun the same command to resume)"
    else:
        rule = f"{what} failed: {e.strerror or e}"
    return ResourceError(rule, file=path, tensor=tensor)


def _resolve(p: Path, what: str) -> Path:
    """Path.resolve that turns a link loop (RuntimeError on Python < 3.13) into a refusal."""
    try:
        return p.resolve()
    except (RuntimeError, OSError) as e:
        raise UnsafePathError(f"{what} cannot be resolved (symlink loop?): {e}", file=p) from None


def _same_or_inside(a: Path, b: Path) -> bool:
    """True when a is b or lies inside b (both resolved)."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_paths(src: Path, dst: Path) -> None:
    """Refuse (exit 6) a DST that is SRC, lies inside it, contains it, or reaches it through links;
    and a DST whose parent folder does not exist (a typo would otherwise create a tree silently)."""
    rs, rd = _resolve(src, "SRC"), _resolve(dst, "DST")
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
    parent = rd.parent
    if not dst.exists() and not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ResourceError(
            f"preparing the output folder failed: DST's parent folder {parent} {what}",
            file=dst,
            hint=f"create it first (mkdir -p {parent}) or choose another DST",
        )


# ---------------------------------------------------------------------------------- single files
def check_output_file(target: str | os.PathLike, protect=(), what: str = "--json") -> Path:
    """Before any work: a file the run will write at the end (a JSON summary or report) can be
    written there, and writing it cannot touch the checkpoints in `protect` (SRC, DST, CKPT):
    refused (exit 6) inside one of them, directly or through a link; exit 5 when its folder is
    missing or not writable. Returns the path."""
    path = Path(target)
    parent = _resolve(path.parent, f"the {what} folder")
    for root in protect:
        r = _resolve(Path(root), "checkpoint folder")
        name = f"{what} {path}"
        if _same_or_inside(parent, r) or _same_or_inside(parent / path.name, r):
            raise UnsafePathError(
                f"{name} lies inside {root}; fp8conv never writes into its source or next to the model",
                file=path,
                hint="write it outside the checkpoint folders",
            )
        if path.is_symlink() and _same_or_inside(_resolve(path, what), r):
            raise UnsafePathError(
                f"{name} is a symlink into {root}; fp8conv never writes through links",
                file=path,
                hint="write it outside the checkpoint folders",
            )
    if not parent.is_dir():
        raise ResourceError(
            f"cannot write the {what} file: its folder {parent} does not exist",
            file=path,
            hint="create the folder first or choose another path",
        )
    if path.is_dir() and not path.is_symlink():
        raise ResourceError(f"cannot write the {what} file: it is a folder", file=path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ResourceError(f"cannot write the {what} file: folder {parent} is not writable", file=path)
    return path


def write_file_atomic(target: str | os.PathLike, data: bytes, protect=(), what: str = "--json") -> None:
    """The one writer for files fp8conv writes outside an output folder (JSON summaries, reports):
    checked as check_output_file does, written to a fresh temporary file beside the target (O_EXCL,
    O_NOFOLLOW: a link planted there is never followed), fsynced, then renamed over the target, so
    a link at the target is replaced rather than written through and no half file is ever seen."""
    path = check_output_file(target, protect, what)
    tmp = path.with_name(f".{path.name}.{TOKEN}.tmp")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise ResourceError(f"cannot write the {what} file: {e.strerror or e}", file=path) from e


def _write_new(path: Path, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- content hash
class Crc32:
    """zlib's CRC-32 with hashlib's update/digest interface, streamed over a tensor's pieces.

    Chosen over sha256 by measurement (bench/bench_scaling.py --hash, docs/failures.md): on one
    thread here zlib.crc32 ran 2-4x faster than sha256, and each byte written is checksummed once;
    dequantize on the loaded 2-core runner took 1.01-1.48x with CRC-32 against 1.18-1.74x with sha256
    over three runs (the machine's load moved the figures). The checksum lives in the file
    it checks, so a cryptographic hash would add no protection against a deliberate edit (whoever
    can change the data can change the record); what it must catch is accidental change (a flipped
    bit, a zeroed or truncated range, a file edited in place), which a CRC-32 per tensor does
    (every burst up to 32 bits, any other change missed with odds of 2^-32)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "little")


def shard_digest(prefix: bytes, tensor_digests: list[bytes]) -> str:
    """A shard's checksum, as recorded in META_HASH: sha256 over the sha256 of the header (with the
    field set to HASH_PLACEHOLDER) followed by the CRC-32 of each tensor's bytes in file order. Per
    tensor, so the writer checksums tensors independently as their pieces are produced (no second
    pass over the data) and a checker can read tensors in parallel."""
    h = hashlib.sha256(hashlib.sha256(prefix).digest())
    for d in tensor_digests:
        h.update(d)
    return h.hexdigest()


def hash_field(digest: str) -> bytes:
    return f'"{META_HASH}":"{digest}"'.encode()


HASH_CHUNK = 8 << 20


def hash_range(fd: int, offset: int, length: int, h=None):
    """CRC-32 (or update h) over bytes [offset, offset+length) of fd, read in chunks."""
    h = h or Crc32()
    buf = bytearray(min(length, HASH_CHUNK))
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(len(buf), length - done)]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "file ended early (it shrank while being hashed)")
        h.update(view[:n])
        done += n
    return h


def confirm_shard(
    path: Path,
    prefix: bytes,
    size: int,
    spans: list[tuple[int, int]],
    known: dict[tuple[int, int], bytes] | None = None,
) -> bool:
    """Whether `path` is exactly the shard this job writes: a regular file of `size` bytes whose
    header equals `prefix` (the expected header with the placeholder hash) up to the hash it
    records, and whose content hashes to that value. Reads the whole file (no stat shortcut: a file
    changed with its mtime restored is caught), but for the spans in `known`: the CRC-32 of those
    bytes as a reader that has just read them computed it (verify's data checks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size != size:
            return False
        head = os.pread(fd, len(prefix), 0)
        at = prefix.find(hash_field(HASH_PLACEHOLDER))
        field = len(hash_field(HASH_PLACEHOLDER))
        if at < 0 or len(head) != len(prefix) or head[:at] != prefix[:at]:
            return False
        if head[at + field :] != prefix[at + field :]:
            return False
        recorded = head[at : at + field].decode("ascii", "replace")[len(META_HASH) + 4 : -1]
        known = known or {}
        digests = [known[(a, b)] if (a, b) in known else hash_range(fd, a, b - a).digest() for a, b in spans]
        return shard_digest(prefix, digests) == recorded
    except OSError:
        return False
    finally:
        os.close(fd)


def recorded_checksum_ok(path: Path, known: dict[tuple[int, int], bytes] | None = None) -> bool | None:
    """For any reader (verify): whether a shard's content still matches the checksum fp8conv
    recorded in its header when it wrote it; None when it records none (not written by fp8conv).
    Needs no plan: the expected header is the file's own with the checksum set back to zeros.
    `known`: CRC-32 digests of tensor spans (absolute start, end) the caller computed as it read them;
    only the other spans are read here."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                return False
            raw = f.read(n)
        header = json.loads(raw)
        recorded = header.get("__metadata__", {}).get(META_HASH)
        if not isinstance(recorded, str):
            return None
        prefix = struct.pack("<Q", n) + raw.replace(hash_field(recorded), hash_field(HASH_PLACEHOLDER), 1)
        entries = sorted(
            (v["data_offsets"] for k, v in header.items() if k != "__metadata__"), key=lambda o: tuple(o)
        )
        spans = [(8 + n + a, 8 + n + b) for a, b in entries]
        size = 8 + n + (spans[-1][1] - 8 - n if spans else 0)
        return confirm_shard(path, prefix, size, spans, known)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return False


def same_content(a: Path, b: Path) -> bool:
    """Byte-equal regular files (a side file in DST and its source), read in chunks."""
    try:
        if not b.is_file() or b.is_symlink() or a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                x, y = fa.read(HASH_CHUNK), fb.read(HASH_CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def same_bytes(path: Path, data: bytes) -> bool:
    try:
        return not path.is_symlink() and path.is_file() and path.read_bytes() == data
    except OSError:
        return False


# ---------------------------------------------------------------------------------- the lock
def _lease() -> float:
    try:
        return max(0.5, float(os.environ.get("FP8CONV_LOCK_LEASE", "60")))
    except ValueError:
        return 60.0


def _read_text(p: str) -> str:
    try:
        with open(p) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or ''."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if ")" in stat else ""


def identity() -> dict:
    """Who this process is, for the lock's records and messages. Host and PID are shown to people;
    liveness is judged from them only within one kernel (boot id) and one PID namespace, where a
    PID plus its start time names one process. FP8CONV_TEST_IDENTITY=HOST:PID (a test hook) fakes
    host and PID and a PID namespace of its own, as a container would have."""
    fake = os.environ.get("FP8CONV_TEST_IDENTITY")
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pidns": "",
        "start": _start_time(os.getpid()),
        "token": TOKEN,
    }
    try:
        me["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    if fake:
        host, _, pid = fake.rpartition(":")
        me.update(host=host, pid=int(pid), pidns="test:" + TOKEN)
    return me


class FolderLock:
    """One job per DST at a time, across processes, containers and machines sharing the folder.

    Built from operations that are atomic on local and network filesystems alike: link(2) of a
    complete temporary file onto a name fails if the name exists (the classic NFS-safe lock), and
    rename(2). `owner` names the job holding DST; the first process to link it wins, a process of a
    different job is refused (exit 6) naming the running one, a process of the same job joins (as
    --part does). `part-I-of-N` keeps two copies of the same part from running at once (refused,
    exit 6). Each process keeps `holders/<token>` alive by touching it every lease/6 seconds.

    A record is stale when its process is gone: on the same kernel and PID namespace, when that
    PID with that start time no longer runs (at once); elsewhere, when its holder's heartbeat is
    older than the lease, measured against the mtime of our own just-touched holder, so the
    filesystem's clock is compared with itself. A stale record is taken over by renaming it to a
    unique name (only one taker succeeds) and checking that the renamed file is the stale one."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.holders = state / HOLDERS
        self.me = identity()
        self.mine = self.holders / TOKEN
        self.names: list[Path] = []
        self.beat: threading.Thread | None = None
        self.stop = threading.Event()
        self.lost = False

    # -- records
    def _record(self, job_id: str, part: str) -> bytes:
        return json.dumps({**self.me, "job": job_id, "part": part, "since": time.time()}).encode()

    @staticmethod
    def _read(p: Path) -> dict | None:
        try:
            rec = json.loads(p.read_text())
            return rec if isinstance(rec, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _now(self) -> float:
        """The filesystem's current time: the mtime of our holder, touched now."""
        try:
            os.utime(self.mine)
            return self.mine.stat().st_mtime
        except OSError:
            return time.time()

    def alive(self, rec: dict | None) -> bool:
        """Whether the process behind a record (owner, part or holder) still runs."""
        if not rec:
            return False
        token = rec.get("token")
        if token == TOKEN:
            return True
        if (
            rec.get("boot_id")
            and rec.get("boot_id") == self.me["boot_id"]
            and rec.get("pidns")
            and rec.get("pidns") == self.me["pidns"]
        ):
            return bool(rec.get("start")) and _start_time(int(rec.get("pid", 0))) == rec.get("start")
        if not isinstance(token, str) or "/" in token or not token:
            return False
        try:
            beat = (self.holders / token).stat().st_mtime
        except OSError:
            return False
        return self._now() - beat < _lease()

    # -- acquire / release
    def acquire(self, job_id: str, part: tuple[int, int] | None) -> None:
        i, n = part or (1, 1)
        part_name = f"part-{i}-of-{n}"
        self.holders.mkdir(exist_ok=True)
        record = self._record(job_id, f"{i}/{n}")
        _remove(self.mine)
        _write_new(self.mine, record, sync=False)
        self.names = [self.mine]
        self._start_heartbeat()
        try:
            for _ in range(100):
                owner = self._take(OWNER_FILE, record)
                if owner is None or owner.get("job") == job_id:
                    break
                if self.alive(owner):
                    raise UnsafePathError(
                        "DST is being written by another fp8conv job: " + describe_holder(owner),
                        file=self.state.parent,
                        hint="wait for it to finish, or choose another DST",
                    )
                self._take_over(OWNER_FILE, owner)
            else:
                raise UnsafePathError("could not take the output folder's lock", file=self.state)
            for _ in range(100):
                other = self._take(part_name, record)
                if other is None:
                    break
                if self.alive(other):
                    raise UnsafePathError(
                        f"the same job (part {i}/{n}) is already running into DST: " + describe_holder(other),
                        file=self.state.parent,
                        hint="wait for it to finish; running the same command again then finds the "
                        "output complete",
                    )
                self._take_over(part_name, other)
            else:
                raise UnsafePathError("could not take the output folder's lock", file=self.state)
        except BaseException:
            self.release()
            raise
        self._sweep()

    def _take(self, name: str, record: bytes) -> dict | None:
        """Link our record to `name`: None when we got it, else the record that holds it. Where the
        filesystem has no hard links (EPERM, ENOTSUP: some FUSE, SMB and sandboxed filesystems), the
        record is created with O_EXCL and written in place; a reader then gives a record that is
        still empty a moment to appear (_read_held) before judging it."""
        tmp = self.state / f"{name}.{TOKEN}.tmp"
        _remove(tmp)
        _write_new(tmp, record, sync=False)
        try:
            os.link(tmp, self.state / name)
            self.names.append(self.state / name)
            return None
        except FileExistsError:
            return self._read_held(self.state / name)
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            try:
                _write_new(self.state / name, record, sync=False)
            except FileExistsError:
                return self._read_held(self.state / name)
            self.names.append(self.state / name)
            return None
        finally:
            _remove(tmp)

    def _read_held(self, p: Path) -> dict:
        for _ in range(40):
            held = self._read(p)
            if held is None:
                return {}  # vanished meanwhile: stale-and-gone
            if held:
                return held
            time.sleep(0.005)  # empty: an O_EXCL writer between create and write
        return {}

    def _take_over(self, name: str, stale: dict) -> None:
        """Move a stale record out of the way; only one of several takers gets it."""
        aside = self.state / f"{name}.stale.{TOKEN}"
        try:
            os.rename(self.state / name, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved != stale and moved and moved.get("token") != stale.get("token"):
            try:  # a fresh record replaced the stale one meanwhile: put it back
                os.link(aside, self.state / name)
            except FileExistsError:
                pass
        _remove(aside)

    def _sweep(self) -> None:
        """Remove the records and temporary files of dead processes."""
        try:
            for h in list(self.holders.iterdir()):
                if h.name != TOKEN and not self.alive({"token": h.name, **(self._read(h) or {})}):
                    _remove(h)
        except OSError:
            pass

    def live_tokens(self) -> set[str]:
        out = {TOKEN} if self.names else set()
        try:
            for h in self.holders.iterdir():
                if self.alive({"token": h.name, **(self._read(h) or {})}):
                    out.add(h.name)
        except OSError:
            pass
        return out

    def others_running(self) -> bool:
        return bool(self.live_tokens() - {TOKEN})

    def _start_heartbeat(self) -> None:
        period = _lease() / 6

        def beat() -> None:
            while not self.stop.wait(period):
                try:
                    os.utime(self.mine)
                except FileNotFoundError:
                    self.lost = True
                    return
                except OSError:
                    pass

        self.beat = threading.Thread(target=beat, name="fp8conv-heartbeat", daemon=True)
        self.beat.start()

    def release(self) -> None:
        self.stop.set()
        if self.beat is not None:
            self.beat.join()
            self.beat = None
        for p in reversed(self.names):
            if p != self.mine and (self._read(p) or {}).get("token") != TOKEN:
                continue  # taken over meanwhile: not ours to remove
            _remove(p)
        self.names = []

    def finish(self, is_complete) -> bool:
        """Give our records back, then, if `is_complete()` holds and no other process of the job is
        alive, remove the state folder. Each process removes its own holder before it looks at
        completeness and at the others, so of processes finishing together the last to look sees
        the others gone: when the output ends complete, at least one of them removes the folder."""
        self.release()
        complete = bool(is_complete())
        if complete and not self.others_running():
            try:
                shutil.rmtree(self.state)
            except FileNotFoundError:
                pass
            except OSError:
                return complete
        return complete


_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


def describe_holder(rec: dict) -> str:
    since = rec.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, float) else "?"
    return (
        f"{rec.get('command', 'a run')} pid {rec.get('pid', '?')} on host {rec.get('host', '?')}, "
        f"part {rec.get('part', '?')}, since {when} (job {str(rec.get('job', '?'))[:12]})"
    )


def job_id(job: dict) -> str:
    return hashlib.sha256(canonical(job).encode()).hexdigest()


def canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------- the folder
class OutputDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.tmp = self.state / "tmp"
        self.lock: FolderLock | None = None
        self.relinked = False  # acquire() replaced a linked state folder: its state is not trusted

    # ---- job identity -------------------------------------------------------------------------
    def read_job(self) -> dict | None:
        """The job DST's state folder was started for; None if there is none, {} if unreadable."""
        if not self.root.is_dir():
            return None
        try:
            job = json.loads((self.state / JOB_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return job if isinstance(job, dict) else {}

    def has_state(self) -> bool:
        return self.state.exists() or self.state.is_symlink()

    def acquire(self, job: dict, part: tuple[int, int] | None, command: str, overwrite: bool = False) -> None:
        """Create DST and its state folder and take the lock (FolderLock) for `job`."""
        self.made = [p for p in (self.root, self.state) if not (p.exists() or p.is_symlink())]
        for p in (self.state, self.state / HOLDERS):
            if p.is_symlink():
                if not overwrite:
                    raise UnsafePathError(
                        "state folder is a symlink; nothing is written through links",
                        file=p,
                        hint="remove it, or pass --overwrite to start over",
                    )
                p.unlink()  # the link itself, never what it points to
                self.relinked = True
        try:
            self.root.mkdir(exist_ok=True)
            self.state.mkdir(exist_ok=True)
            lock = FolderLock(self.state)
            lock.me["command"] = command
            lock.acquire(job_id(job), part)
        except FileNotFoundError:  # the folder was being closed by a finishing run: once more
            self.state.mkdir(exist_ok=True)
            lock = FolderLock(self.state)
            lock.me["command"] = command
            lock.acquire(job_id(job), part)
        except OSError as e:
            self._unmake()
            raise io_error(e, self.root, "preparing the output folder") from e
        except BaseException:
            self._unmake()
            raise
        self.lock = lock

    def _unmake(self) -> None:
        """The lock was not taken: remove what acquire() made, so DST is left as it was found."""
        for p in (self.state / HOLDERS, *reversed(self.made)):
            try:
                p.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        """Give the lock back; a run that got no further than the lock leaves DST as it found it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if not (self.state / JOB_FILE).exists():
                for p in (self.state / HOLDERS, *reversed(getattr(self, "made", []))):
                    try:
                        p.rmdir()
                    except OSError:
                        pass

    def finish(self, is_complete) -> bool:
        """The run is over: give the lock back; remove the state folder when the output is complete
        (`is_complete()`) and no other process of the job still runs. Returns is_complete()."""
        lock, self.lock = self.lock, None
        return lock.finish(is_complete) if lock is not None else bool(is_complete())

    def check_lock(self) -> None:
        if self.lock is not None and self.lock.lost:
            raise UnsafePathError(
                "another process removed this run's record from DST's lock (took it over as stale?)",
                file=self.state,
                hint="check that no other fp8conv job writes into DST, then rerun the same command",
            )

    def precheck(self, job: dict, overwrite: bool, expected: set[str], finished_job: dict | None) -> None:
        """prepare()'s refusals, read-only and before the lock is taken, so a refused run leaves DST
        exactly as it was; and a different job that is running now is named."""
        if not self.root.is_dir():
            return
        if self.has_state() and not self.state.is_symlink():
            owner = FolderLock._read(self.state / OWNER_FILE)
            if owner and owner.get("job") != job_id(job) and FolderLock(self.state).alive(owner):
                raise UnsafePathError(
                    "DST is being written by another fp8conv job: " + describe_holder(owner),
                    file=self.root,
                    hint="wait for it to finish, or choose another DST",
                )
        self._refuse(job, overwrite, expected, finished_job)

    def _refuse(self, job: dict, overwrite: bool, expected: set[str], finished_job: dict | None):
        existing = self.read_job()
        if existing is None:
            existing = finished_job
        has_content = self._has_content()
        linked = [d for d in (self.state, self.tmp, self.state / HOLDERS) if d.is_symlink()]
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
        strays = [] if overwrite else self.strays(expected)
        if strays:
            shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
            raise UnsafePathError(
                f"DST holds {len(strays)} file(s) this job does not write: {shown}",
                file=self.root,
                hint="remove them, or pass --overwrite to have them removed",
            )
        return existing, has_content, linked

    def prepare(
        self,
        job: dict,
        overwrite: bool,
        expected: set[str],
        finished_job: dict | None,
    ) -> None:
        """Adopt DST for `job` (lock held); refuse foreign content unless overwrite; clear tmp/ of
        dead processes' files. `expected` is every file a complete output holds; `finished_job`
        the job recorded in shards already in DST, if any."""
        existing, has_content, linked = self._refuse(job, overwrite, expected, finished_job)
        try:
            if overwrite and ((existing != job and has_content) or linked or self.relinked):
                self.clear()
                existing = None
            elif overwrite:
                self._drop_links()
                for rel in self.strays(expected):
                    _remove(self.root / rel)
            if self.tmp.is_symlink():
                self.tmp.unlink()
            self.tmp.mkdir(exist_ok=True)
            live = self.lock.live_tokens() if self.lock else {TOKEN}
            for leftover in self.tmp.iterdir():
                if leftover.name.rsplit(".", 1)[-1] not in live:
                    _remove(leftover)
            if self.read_job() != job:
                self.write_json_atomic(self.state / JOB_FILE, job)
        except OSError as e:
            raise io_error(e, self.root, "preparing the output folder") from e

    def strays(self, expected: set[str]) -> list[str]:
        """Files and folders in DST that a complete output of this job does not hold."""
        dirs = {str(Path(rel).parent) for rel in expected}
        dirs |= {str(p) for rel in dirs for p in Path(rel).parents}
        found: list[str] = []
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            if rel_dir == Path("."):
                dirnames[:] = [d for d in dirnames if d != STATE_DIR]
            for d in list(dirnames):
                rel = str(rel_dir / d)
                if rel not in dirs:
                    found.append(rel + "/")
                    dirnames.remove(d)
            for f in filenames:
                rel = str(rel_dir / f)
                if rel not in expected:
                    found.append(rel)
        return sorted(found)

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
        """Anything besides the state folder."""
        try:
            return self.root.is_dir() and any(c.name != STATE_DIR for c in self.root.iterdir())
        except OSError as e:
            raise io_error(e, self.root, "listing the output folder") from e

    def clear(self) -> None:
        """--overwrite: everything but the lock's records goes."""
        try:
            for child in self.root.iterdir():
                if child.name != STATE_DIR or child.is_symlink():
                    _remove(child)
            for name in (JOB_FILE, "tmp", "done", "complete"):
                p = self.state / name
                if p.exists() or p.is_symlink():
                    _remove(p)
        except OSError as e:
            raise io_error(e, self.root, "clearing the output folder (--overwrite)") from e

    # ---- atomic files -------------------------------------------------------------------------
    def tmp_path(self, rel: str) -> Path:
        return self.tmp / f"{rel.replace('%', '%25').replace('/', '%2F')}.{TOKEN}"

    def commit(self, tmp: Path, rel: str) -> None:
        """fsync tmp, rename it to DST/rel (replacing a link there, never following one)."""
        self.check_lock()
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
        tmp = path.with_name(f"{path.name}.{TOKEN}.tmp")
        data = json.dumps(obj, sort_keys=True).encode()
        try:
            _remove(tmp)
            _write_new(tmp, data)
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
