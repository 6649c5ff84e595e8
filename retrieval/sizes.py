"""Starbucks sizes: `Size(name, layers, dim)`, named size lists, parsing and validation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from retrieval.errors import StarbucksError
from retrieval.names import parse_names

_LXD = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True)
class Size:
    """A sub-network: the first `layers` layers, the first `dim` embedding dimensions.

    An empty name means the size is called by its `LxD` key.
    """

    name: str
    layers: int
    dim: int

    def __post_init__(self):
        if self.layers < 1 or self.dim < 1:
            raise StarbucksError(f"size {self.layers}x{self.dim} is invalid: layers and dim must be >= 1")
        if not self.name:
            object.__setattr__(self, "name", f"{self.layers}x{self.dim}")

    @property
    def key(self) -> str:
        """`<layers>x<dim>`, the name-independent identity of a size."""
        return f"{self.layers}x{self.dim}"

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": self.layers, "dim": self.dim}

    def __str__(self) -> str:
        return self.name if self.name == self.key else f"{self.name} ({self.key})"


class SizeList(Sequence[Size]):
    """An ordered list of sizes (small to large), looked up by name or by `LxD`."""

    def __init__(self, sizes: Iterable[Size]):
        self._sizes = list(sizes)
        if not self._sizes:
            raise StarbucksError("the size list is empty: give at least one size in `sizes`")
        seen = {}
        for s in self._sizes:
            if s.name in seen:
                raise StarbucksError(f"size name {s.name!r} is used twice in the size list; names must be unique")
            seen[s.name] = s

    @classmethod
    def from_config(cls, entries) -> "SizeList":
        """Build from config entries: `{name, layers, dim}` mappings or `LxD` strings."""
        sizes = []
        for i, e in enumerate(entries or []):
            if isinstance(e, str):
                sizes.append(parse_size(e))
            else:
                try:
                    sizes.append(Size(str(e.get("name") or ""), int(e["layers"]), int(e["dim"])))
                except (KeyError, TypeError, ValueError):
                    raise StarbucksError(
                        f"sizes[{i}] = {e!r} is not a size: write {{name: grande, layers: 8, dim: 256}} or '8x256'"
                    ) from None
        return cls(sizes)

    def __getitem__(self, i):
        return self._sizes[i]

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[Size]:
        return iter(self._sizes)

    def __repr__(self) -> str:
        return "SizeList([" + ", ".join(str(s) for s in self._sizes) + "])"

    @property
    def largest(self) -> Size:
        """The full size: most layers, then most dims (the KL teacher)."""
        return max(self._sizes, key=lambda s: (s.layers, s.dim))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._sizes]

    def get(self, spec: str | Size) -> Size:
        """A size by name (`grande`) or `LxD` (`8x256`; the configured name is kept if it matches)."""
        return parse_size(spec, self)

    def select(self, specs: str | Sequence[str] | None) -> "SizeList":
        """Sizes named by a comma list / sequence; all of them when `specs` is empty or `all`."""
        if specs is None or isinstance(specs, str):
            specs = parse_names(specs)
            if specs is None:
                return self
        return SizeList(self.get(s) for s in specs)

    def require_ordered(self, what: str = "sizes") -> "SizeList":
        """Refuse a list that is not ordered small to large (layers and dims never decrease, no size
        twice), naming the first pair out of order."""
        for a, b in zip(self._sizes, self._sizes[1:]):
            if b.layers < a.layers or b.dim < a.dim or (a.layers, a.dim) == (b.layers, b.dim):
                raise StarbucksError(
                    f"{what} must be ordered small to large (layers and dims increasing): {b} comes after {a}; "
                    f"reorder the list"
                )
        return self

    def validate(self, num_layers: int, hidden: int, model_name: str = "the model") -> "SizeList":
        """Raise a clear error if a size asks for more layers or dims than the model has."""
        for s in self._sizes:
            check_size(s, num_layers, hidden, model_name)
        return self

    def to_config(self) -> list[dict]:
        return [s.to_dict() for s in self._sizes]


def parse_size(spec: str | Size, known: Iterable[Size] = ()) -> Size:
    """Parse `grande` (a name from `known`) or `8x256`."""
    if isinstance(spec, Size):
        return spec
    text = str(spec).strip()
    known = list(known)
    for s in known:
        if s.name == text:
            return s
    m = _LXD.match(text)
    if m:
        layers, dim = int(m.group(1)), int(m.group(2))
        for s in known:
            if s.layers == layers and s.dim == dim:
                return s
        return Size("", layers, dim)
    names = ", ".join(s.name for s in known) or "none configured"
    raise StarbucksError(f"unknown size {text!r}: use a configured name ({names}) or LAYERSxDIM such as 8x256")


def check_size(size: Size, num_layers: int, hidden: int, model_name: str = "the model") -> None:
    """Raise if `size` does not fit a model with `num_layers` layers and `hidden` dims."""
    if size.layers > num_layers:
        raise StarbucksError(
            f"size {size} asks for {size.layers} layers but {model_name} has only {num_layers}; "
            f"use layers <= {num_layers} or a deeper model"
        )
    if size.dim > hidden:
        raise StarbucksError(
            f"size {size} asks for {size.dim} dims but {model_name} has only {hidden}; "
            f"use dim <= {hidden} or a wider model"
        )


def meta_sizes(meta: Mapping) -> SizeList | None:
    """The size list recorded in a checkpoint's `starbucks.json`, if any."""
    return SizeList.from_config(meta["sizes"]) if meta.get("sizes") else None
