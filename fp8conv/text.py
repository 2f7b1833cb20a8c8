"""Text helpers shared by the CLI and the renderers (no torch, no rich)."""

from __future__ import annotations


def middle(name: str, width: int) -> str:
    """`name` whole if it fits, else its start and end around an ellipsis (the end tells tensors apart)."""
    if len(name) <= width or width < 5:
        return name
    keep = width - 1
    head = keep // 3
    return name[:head] + "…" + name[len(name) - (keep - head) :]
