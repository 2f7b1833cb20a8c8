"""Progress accounting shared by every renderer, and the tqdm renderer the Python API uses.

Conversions and verify report through the callbacks of `fp8conv.convert.engine.Progress` (start,
advance, shard_done, note, close). `ProgressCounter` turns them into honest figures: bytes done,
bytes taken from an earlier run (a resumed shard is not work done now, so it is not speed), and a
rate and time left only once there is data to base them on. The CLI draws them with rich;
`TqdmProgress` draws them with `tqdm.auto` (a widget in notebooks, a bar on a terminal).
"""

from __future__ import annotations

import threading
import time

# A rate is shown once this much time has passed and some bytes were converted in this run; before
# that a figure is noise (a first line said "ETA 11225s" for a 14 s job).
MIN_SECONDS_FOR_RATE = 1.0


class ProgressCounter:
    """Counts bytes; bytes of shards kept from an earlier run are counted apart (`resumed`).

    The engine reports a kept shard as `advance(its size)` followed at once by `shard_done(name,
    skipped=True)` on the same thread; written shards advance piece by piece from several threads.
    So each thread's latest advance is held back until that thread's next call, and a skip turns
    the held bytes into resumed bytes before they are counted as done in this run.
    """

    def __init__(self) -> None:
        self.total = 0
        self.total_shards = 0
        self.device = ""
        self.converted = 0  # bytes processed by this run
        self.resumed = 0  # bytes of shards an earlier run finished
        self.shards = 0
        self.t0 = time.monotonic()
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    # -- callbacks -------------------------------------------------------------------------------
    def start(self, total_bytes: int, total_shards: int, device: str) -> None:
        self.total, self.total_shards, self.device = total_bytes, total_shards, device
        self.t0 = time.monotonic()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            tid = threading.get_ident()
            self.converted += self._held.pop(tid, 0)
            self._held[tid] = nbytes

    def shard_done(self, name: str, skipped: bool = False) -> None:
        with self._lock:
            held = self._held.pop(threading.get_ident(), 0)
            if skipped:
                self.resumed += held
            else:
                self.converted += held
            self.shards += 1

    def note(self, message: str) -> None: ...

    def close(self) -> None:
        self.flush()

    def flush(self) -> None:
        with self._lock:
            self.converted += sum(self._held.values())
            self._held.clear()

    # -- figures ---------------------------------------------------------------------------------
    @property
    def done(self) -> int:
        # Read by the display's refresh thread while writer threads advance: under the lock.
        with self._lock:
            return self.converted + self.resumed + sum(self._held.values())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def rate(self) -> float | None:
        """Bytes per second converted by this run, or None while there is no data for one."""
        dt = self.elapsed
        if self.converted <= 0 or dt < MIN_SECONDS_FOR_RATE:
            return None
        return self.converted / dt

    def eta(self) -> float | None:
        """Seconds left at the current rate, or None while the rate is unknown."""
        r = self.rate()
        if r is None:
            return None
        return max(0.0, (self.total - self.done) / r)


class TqdmProgress(ProgressCounter):
    """A `tqdm.auto` bar in bytes (the Python API's default; pass progress=False for none)."""

    def __init__(self, desc: str) -> None:
        super().__init__()
        self.desc = desc
        self.bar = None

    def start(self, total_bytes: int, total_shards: int, device: str) -> None:
        from tqdm.auto import tqdm

        super().start(total_bytes, total_shards, device)
        # smoothing=0: the rate is the average since start over `n - initial`, and resumed bytes are
        # added to `initial`, so they never count as speed.
        self.bar = tqdm(
            total=total_bytes,
            desc=f"{self.desc} on {device}",
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            smoothing=0,
            dynamic_ncols=True,
            leave=True,
        )

    def _sync(self) -> None:
        if self.bar is None:
            return
        counted = self.converted + self.resumed
        self.bar.initial = self.resumed
        self.bar.update(counted - self.bar.n)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self._sync()

    def shard_done(self, name: str, skipped: bool = False) -> None:
        super().shard_done(name, skipped)
        self._sync()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.shards}/{self.total_shards} shards", refresh=False)

    def note(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"note: {message}")

    def close(self) -> None:
        self.flush()
        self._sync()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NoProgress:
    """Reports nothing (progress=False)."""

    def start(self, total_bytes: int, total_shards: int, device: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def shard_done(self, name: str, skipped: bool = False) -> None: ...
    def note(self, message: str) -> None: ...
    def close(self) -> None: ...
