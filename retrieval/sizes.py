"""Starbucks sizes: `Size(name, layers, dim)`, named size lists, parsing and validation.

A *hybrid* size joins plain sizes' embeddings end to end (`3x384+6x64`): its score is the sum of
its parts' scores, optionally weighted (`0.5*3x384+6x64`: the part's vectors scaled by `sqrt(0.5)`
on both sides), and a part may come from another model (`6x64@width`: the model that
`encode.part_models.width` names). Its dim is the sum of its parts' dims, its layers the deepest
part's (what encoding it costs); it is named by its spec (`Size.key`), never by a configured name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from retrieval.errors import StarbucksError
from retrieval.names import parse_names

_LXD = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# one part of a hybrid: [weight*]size[@model]
_PART = re.compile(r"^\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*)?\s*([^*@+]+?)\s*(?:@\s*([A-Za-z0-9_][A-Za-z0-9_.-]*))?\s*$")
HYBRID_HELP = "write a hybrid as PART+PART, each PART [WEIGHT*]LxD[@MODEL], e.g. 3x384+0.5*6x64@width"


@dataclass(frozen=True)
class Part:
    """One part of a hybrid size: a plain size of a model (`model`: "" for the model itself, else the
    label of another one), its score weighted by `weight` (> 0)."""

    size: "Size"
    weight: float = 1.0
    model: str = ""

    @property
    def key(self) -> str:
        """`[weight*]LxD[@model]`, the weight left out when it is 1."""
        weight = "" if self.weight == 1 else f"{_number(self.weight)}*"
        return f"{weight}{self.size.key}" + (f"@{self.model}" if self.model else "")


def _number(x: float) -> str:
    """A weight as written in a spec: plain decimals, no exponent (`0.5`, `2`, `0.0001`)."""
    text = f"{x:.12f}".rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class Size:
    """A sub-network: the first `layers` layers, the first `dim` embedding dimensions; or a hybrid of
    such sizes (`parts`, see `hybrid_size`).

    An empty name means the size is called by its `LxD` key (a hybrid: by its spec).
    """

    name: str
    layers: int
    dim: int
    parts: tuple[Part, ...] = ()
    precision: str = ""  # a run's quantised search of the size (`int8`, `binary-rescore40`; retrieval.quantize)

    def __post_init__(self):
        if self.layers < 1 or self.dim < 1:
            raise StarbucksError(f"size {self.layers}x{self.dim} is invalid: layers and dim must be >= 1")
        if self.parts and (self.layers, self.dim) != (
            max(p.size.layers for p in self.parts),
            sum(p.size.dim for p in self.parts),
        ):
            raise ValueError("a hybrid's layers are its deepest part's and its dim the sum of its parts' dims")
        if not self.name:
            object.__setattr__(self, "name", self.key)

    @property
    def key(self) -> str:
        """`<layers>x<dim>`, the name-independent identity of a size; a hybrid's spec (`3x384+6x64@width`)."""
        if self.parts:
            return "+".join(p.key for p in self.parts)
        return f"{self.layers}x{self.dim}"

    @property
    def is_hybrid(self) -> bool:
        return bool(self.parts)

    @property
    def ident(self) -> tuple:
        """What tells sizes apart in a table, sortable: `(layers, dim)`, and for a hybrid `(layers, dim,
        spec)` (a hybrid may share its layers and dim with a plain size), then a quantised run's precision."""
        ident = (self.layers, self.dim, self.key) if self.parts else (self.layers, self.dim)
        return (*ident, self.precision) if self.precision else ident

    @property
    def models(self) -> list[str]:
        """The labels of the other models a hybrid's parts come from, in order of first use."""
        return list(dict.fromkeys(p.model for p in self.parts if p.model))

    def to_dict(self) -> dict:
        if self.parts:
            return {"name": self.name, "layers": self.layers, "dim": self.dim, "parts": self.key}
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
            elif isinstance(e, dict) and e.get("parts"):
                sizes.append(parse_size(str(e["parts"])))
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
        twice), naming the first pair out of order; a hybrid is no size of such a list."""
        for s in self._sizes:
            if s.parts:
                raise StarbucksError(
                    f"{what} holds the hybrid {s.key}: a size list (what a model is trained and "
                    f"described at) holds plain sizes; ask for hybrids in encode.sizes"
                )
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
    """Parse `grande` (a name from `known`), `8x256`, or a hybrid (`3x384+0.5*6x64@width`, see
    `hybrid_size`)."""
    if isinstance(spec, Size):
        return spec
    text = str(spec).strip()
    known = list(known)
    for s in known:
        if s.name == text:
            return s
    if "+" in text:
        return hybrid_size([_parse_part(p, known, text) for p in text.split("+")])
    if "*" in text or "@" in text:
        raise StarbucksError(f"size {text!r} has one part: a weight or @model belongs to a hybrid; {HYBRID_HELP}")
    m = _LXD.match(text)
    if m:
        layers, dim = int(m.group(1)), int(m.group(2))
        for s in known:
            if s.layers == layers and s.dim == dim and not s.parts:
                return s
        return Size("", layers, dim)
    names = ", ".join(s.name for s in known) or "none configured"
    raise StarbucksError(f"unknown size {text!r}: use a configured name ({names}) or LAYERSxDIM such as 8x256")


def _parse_part(text: str, known: list[Size], spec: str) -> Part:
    m = _PART.match(text)
    if not m:
        raise StarbucksError(f"hybrid size {spec!r}: part {text.strip()!r} is not [WEIGHT*]SIZE[@MODEL]; {HYBRID_HELP}")
    weight, name, model = m.group(1), m.group(2), m.group(3) or ""
    if model and not _LXD.match(name):
        raise StarbucksError(
            f"hybrid size {spec!r}: part {text.strip()!r} comes from model {model!r}, so give its "
            f"size as LxD (a size name belongs to this model's list)"
        )
    size = parse_size(name, () if model else known)
    if size.parts:
        raise StarbucksError(f"hybrid size {spec!r}: part {name!r} is itself a hybrid; list its parts instead")
    weight = float(weight) if weight is not None else 1.0
    if not weight > 0:
        raise StarbucksError(f"hybrid size {spec!r}: part {text.strip()!r} has weight {weight:g}; weights must be > 0")
    return Part(size, weight, model)


def hybrid_size(parts: Sequence[Part]) -> Size:
    """The hybrid of `parts` (two or more, no part twice): its embedding is the parts' embeddings end to
    end, each scaled by `sqrt(weight)`, so its inner product is the weighted sum of the parts' scores;
    its layers are the deepest part's, its dim the sum of the parts' dims; named by its spec."""
    parts = tuple(parts)
    if len(parts) < 2:
        raise StarbucksError(f"a hybrid joins two or more parts; {HYBRID_HELP}")
    seen = set()
    for p in parts:
        if (p.size.key, p.model) in seen:
            raise StarbucksError(
                f"hybrid size {'+'.join(q.key for q in parts)}: part {p.size.key}"
                f"{'@' + p.model if p.model else ''} is given twice; weight it instead (2*{p.size.key})"
            )
        seen.add((p.size.key, p.model))
    return Size("", max(p.size.layers for p in parts), sum(p.size.dim for p in parts), parts)


def hybrid_key(name: str) -> str:
    """A hybrid's name as stores, runs and evals know it (its spec as `Size.key` writes it: `3x384 + 1*6x64`
    is `3x384+6x64`); any other name as it is, and so a hybrid that names a size of a model's list, which
    only that list resolves."""
    if "+" not in str(name):
        return name
    try:
        return parse_size(str(name)).key
    except StarbucksError:
        return name


def recorded_size(name: str, layers: int, dim: int) -> Size:
    """A size as a file records it (`size`, `layers`, `dim`): a hybrid is named by its spec, which gives
    back its parts (checked against the recorded layers and dim)."""
    if "+" not in str(name):
        return Size(str(name), int(layers), int(dim))
    size = parse_size(str(name))
    if (size.layers, size.dim) != (int(layers), int(dim)):
        raise StarbucksError(
            f"hybrid size {name} is recorded with {layers}x{dim}, its parts give "
            f"{size.layers}x{size.dim}; the file was edited: re-create it"
        )
    return size


def check_size(size: Size, num_layers: int, hidden: int, model_name: str = "the model") -> None:
    """Raise if `size` does not fit a model with `num_layers` layers and `hidden` dims (a hybrid: each of
    its parts from this model; the parts from other models are theirs to check)."""
    if size.parts:
        for p in size.parts:
            if not p.model:
                check_size(p.size, num_layers, hidden, model_name)
        return
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
