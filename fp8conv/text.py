"""Text helpers shared by the CLI, the planners and the renderers (no torch, no rich)."""

from __future__ import annotations

import fnmatch
import re


def first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first pattern (a glob, or `re:` and a regular expression searched for) that matches `name`:
    what --skip, --only and verify's --tensors take."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return p
        elif fnmatch.fnmatchcase(name, p):
            return p
    return None


def middle(name: str, width: int) -> str:
    """`name` whole if it fits, else its start and end around an ellipsis (the end tells tensors apart)."""
    if len(name) <= width or width < 5:
        return name
    keep = width - 1
    head = keep // 3
    return name[:head] + "…" + name[len(name) - (keep - head) :]
