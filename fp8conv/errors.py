"""Typed errors. Each class knows its exit code; only the CLI turns them into exits."""

from __future__ import annotations


class Fp8convError(Exception):
    """Base class: a failure the user can act on, with file, tensor and rule named."""

    exit_code = 1
    kind = "error"

    def __init__(
        self,
        rule: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.rule = rule
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.tensor:
            where.append(f"tensor {self.tensor!r}")
        text = ": ".join(where + [self.rule]) if where else self.rule
        if self.hint:
            text += f" ({self.hint})"
        # One line, whatever a file or tensor name holds: a newline in a name would split the error
        # line that logs and greps rely on.
        return text.replace("\r", "\\r").replace("\n", "\\n")

    def to_dict(self) -> dict:
        return {
            "error": self.kind,
            "exit_code": self.exit_code,
            "file": self.file,
            "tensor": self.tensor,
            "rule": self.rule,
            "hint": self.hint,
        }


class VerificationFailed(Fp8convError):
    exit_code = 1
    kind = "verification_failed"


class UsageError(Fp8convError):
    exit_code = 2
    kind = "usage"


class InvalidCheckpoint(Fp8convError):
    exit_code = 3
    kind = "invalid_input"


class NonFiniteError(Fp8convError):
    exit_code = 4
    kind = "non_finite"


class ResourceError(Fp8convError):
    exit_code = 5
    kind = "io_error"


class UnsafePathError(Fp8convError):
    exit_code = 6
    kind = "unsafe_path"


class Interrupted(Fp8convError):
    exit_code = 130
    kind = "interrupted"

    def __init__(self, signum: int = 2) -> None:
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}; nothing partial was left under a final name")
        # 128 + signal number, as shells report it: 130 for SIGINT, 143 for SIGTERM.
        self.exit_code = 128 + signum


EXIT_CODES = {
    0: "success",
    1: "verification failed",
    2: "usage error (bad option or argument)",
    3: "invalid input checkpoint (format, index, missing or misshapen scale, unsupported dtype)",
    4: "non-finite numbers where the policy forbids them (NaN/Inf weights, NaN codes, bad scales)",
    5: "I/O or resource failure (disk full, permission, file changed while read)",
    6: "unsafe path or overwrite refused (DST is SRC or inside it, DST holds other content, changed job)",
    130: "interrupted (Ctrl-C); 143 for SIGTERM",
}
