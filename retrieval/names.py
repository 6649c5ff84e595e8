"""Selections of named things (sizes, splits) as written in configs and on the command line."""

from __future__ import annotations


def parse_names(spec) -> list[str] | None:
    """A comma list (`"dev,test"`) or sequence of names; None for everything (`all`, empty)."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return None
    items = spec.split(",") if isinstance(spec, str) else spec
    return [w for w in (str(p).strip() for p in items) if w]
