"""Report pieces every stage and the benchmarks share: tables (terminal, Markdown, CSV) and plots of metrics against size."""

from __future__ import annotations

import csv
import io
import os
from typing import Mapping, Sequence

from retrieval.io import atomic_path, atomic_write_text
from retrieval.sizes import Size

Row = Sequence[str]


def size_label(size: Size, sep: str = " ") -> str:
    """`grande (4x128)`, or just `4x128` for an unnamed size."""
    return size.key if size.name == size.key else f"{size.name}{sep}({size.key})"


def text_table(headers: Row, rows: Sequence[Row]) -> str:
    """Aligned columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: Row, rows: Sequence[Row]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_csv(path: str | os.PathLike, headers: Row, rows: Sequence[Row]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_measures(
    series: Mapping[str, Sequence[tuple[Size, Mapping[str, float]]]],
    measures: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> None:
    """One panel per measure, the sizes in order on the x axis, one line per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes: dict[tuple, Size] = {}
    for points in series.values():
        for size, _ in points:
            sizes.setdefault(size.ident, size)
    order = sorted(sizes)
    position = {key: i for i, key in enumerate(order)}
    fig, axes = plt.subplots(1, len(measures), figsize=(1.2 + 3.6 * len(measures), 3.6), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        for label, points in series.items():
            points = sorted((position[s.ident], values[measure]) for s, values in points if measure in values)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        ax.set_xticks(range(len(order)), [size_label(sizes[k], "\n") for k in order], fontsize=8)
        ax.set_title(measure)
        ax.grid(alpha=0.3)
    if len(series) > 1:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
