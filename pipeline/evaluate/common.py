"""What both tasks' evaluate stages share (`evaluate` for the causal LMs, `classify_evaluate` for
the sequence classifiers), so neither copies the other:

- the models given: `NAME=PATH` arguments (`parse_named`), the refusal of a missing folder, and
  what is known about a loaded model without running it (`Model`, `describe_model`: parameters,
  nonzero parameters, bytes on disk; for a compressed folder, from its manifest), and which
  compressed model was made from which evaluated one (`derived_from`);
- timing: `fastest_times` runs every model on its fixed input in interleaved, order-rotated
  rounds and keeps each model's fastest round;
- what the reports share: plot-table CSV text, number formats, one colour per model (a
  compressed model takes its source's), axes style and a legend above the panels.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.compress.compress import folder_bytes, weight_bytes
from pipeline.compress.compressed import is_compressed, parameter_counts, read_manifest
from pipeline.core.errors import InputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
"""Allowed model names (they become file names of plot tables and figure labels)."""


def parse_named(values: list[str], option: str) -> list[tuple[str, Path]]:
    """[(name, path)] from `NAME=PATH` strings; InputError for bad syntax or repeated names."""
    out: list[tuple[str, Path]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not NAME_RE.match(name) or not path:
            raise InputError(
                f"{option} {value!r}: expected NAME=PATH with NAME made of letters, digits, "
                "'.', '_' or '-' (e.g. student-kd=models/student-kd)"
            )
        if name in [n for n, _ in out]:
            raise InputError(f"{option} {value!r}: the name '{name}' is given twice")
        out.append((name, Path(path)))
    return out


def check_model_folder(name: str, path: Path) -> None:
    """Refuse a model folder that does not exist, naming the model and the path."""
    if not path.is_dir():
        raise InputError(
            f"model '{name}': {path}: no such folder (train or compress it first, or fix the "
            "--model argument)"
        )


@dataclass
class Model:
    """A model to evaluate, loaded, with what is known about it without running it."""

    name: str
    path: Path
    module: nn.Module
    compressed: bool
    source: Path | None
    """The folder a compressed model was made from (its manifest's source.path), else None."""
    parameters: int
    nonzero_parameters: int
    weights_bytes: int
    size_bytes: int


def describe_model(name: str, path: Path, module: nn.Module) -> Model:
    """`module` (loaded from `path`) with its counts and sizes: parameters and nonzeros from the
    manifest of a compressed folder (what its stored tensors hold), else counted on the module."""
    if is_compressed(path):
        manifest = read_manifest(path)
        params, nonzero = manifest["parameters"], manifest["nonzero_parameters"]
        source: Path | None = Path(manifest["source"]["path"])
    else:
        params, nonzero = parameter_counts(module)
        source = None
    return Model(
        name=name,
        path=path,
        module=module,
        compressed=source is not None,
        source=source,
        parameters=int(params),
        nonzero_parameters=int(nonzero),
        weights_bytes=weight_bytes(path),
        size_bytes=folder_bytes(path),
    )


def derived_from(models: list[Model]) -> dict[str, str]:
    """{compressed model: the evaluated model it was made from}, for those whose source folder
    is among the evaluated ones (figures give the pair one colour)."""
    by_path = {m.path.resolve(): m.name for m in models}
    return {
        m.name: by_path[m.source.resolve()]
        for m in models
        if m.source is not None and m.source.resolve() in by_path
    }


def fastest_times(calls: dict[str, Callable[[], Any]], throughput_repeats: int) -> dict[str, float]:
    """Seconds of each call's fastest run: one warm-up run each, then `throughput_repeats` rounds in which
    every call runs once, the order rotating by one each round (a burst of load from elsewhere
    then does not land on one model only; load only ever adds time, so the minimum is the least
    noisy estimate of what the model itself costs)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        calls[name]()  # warm-up: allocations, kernel selection, weight packing
    for r in range(throughput_repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


# -- what the reports share ---------------------------------------------------------------------


def fmt(value: float) -> str:
    """A number for a plot table: 6 significant digits."""
    return f"{value:.6g}"


def mb(n: int) -> str:
    """Bytes for reading: MB from 100 kB up, else kB."""
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV with a header from the first row's keys, `\\n` line ends."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def model_colors(names: list[str], derived: dict[str, str]) -> dict[str, Any]:
    """One colour per model; a compressed model takes the colour of the model it came from."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    own = [n for n in names if n not in derived]
    colors = {name: cmap(i % 10) for i, name in enumerate(own)}
    for name, source in derived.items():
        colors[name] = colors.get(source, cmap(len(colors) % 10))
    return colors


def style_axes(ax: Any) -> None:
    """No top/right spines, a light grid behind the data."""
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, axis="both", alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)


def legend_on_top(fig: Any, handles: list, labels: list[str], y: float) -> None:
    """One legend for the figure, centred above its panels at height `y` (figure fraction)."""
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, y),
        ncols=min(len(labels), 5),
        frameon=False,
        fontsize=9.5,
    )


def log_size_axis(ax: Any) -> None:
    """A log-scale x axis for sizes in MB, labelled at 1, 2 and 5 per decade in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
