"""What `evaluate` writes for people and for DVC: plot tables, matplotlib figures, a Markdown report.

- Plot tables (`dvc plots show` / `dvc plots diff`): `<plots>/perplexity/<model>.csv`, one per
  model (lang, perplexity, KL, top-1 agreement, tokens), so a bar chart per model compares
  revisions; `<plots>/size_quality.csv`, one row per model (weights MB, perplexity, KL, top-1
  agreement, tokens/s, parameters) for a size-vs-quality scatter. Per-model files keep the
  dvc.yaml plot definitions independent of the model names.
- Figures (PNG, matplotlib's Agg backend, no display needed): per-language perplexity as grouped
  horizontal bars (languages sorted by the first model's perplexity), size vs quality (four
  panels sharing the size axis), and training curves read from each student's dvclive folder.
- `report.md` next to the figures, linking them relatively, so the folder is self-contained.

Each model keeps one colour in every figure (argv order). Numbers are rounded for reading only;
the exact values are in the metrics JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir
from pipeline.evaluate.common import (
    csv_text,
    fmt,
    legend_on_top,
    log_size_axis,
    mb,
    model_colors,
    style_axes,
)

PERPLEXITY_DIR = "perplexity"
SIZE_QUALITY = "size_quality.csv"
FIG_LANG = "perplexity_by_language.png"
FIG_SIZE = "size_vs_quality.png"
FIG_CURVES = "training_curves.png"
CURVE_METRICS = (
    ("train/ce", "train next-token CE (nats)"),
    ("val/perplexity", "validation perplexity"),
)
"""dvclive metrics drawn as training curves (CE is logged for KD and CE students alike)."""
FALLBACK_CURVE = ("train/loss", "train loss")


def _coverage(store: dict) -> str:
    """The store's mass coverage, or why there is none (a sample store without logprobs)."""
    if store.get("topk_mass_coverage") is None:
        return "ids and counts only (no logprobs, so no mass coverage)."
    return f"mean mass coverage of the stored ids {100 * store['topk_mass_coverage']:.1f}%."


def write_plot_tables(
    plots: Path, results: dict[str, dict[str, Any]], per_language: dict[str, dict[str, dict]]
) -> None:
    """Write the DVC plot tables (module docstring) into `plots`, replacing it atomically."""
    with atomic_dir(plots) as tmp:
        (tmp / PERPLEXITY_DIR).mkdir()
        for name, langs in per_language.items():
            rows = [
                {
                    "lang": lang,
                    "perplexity": fmt(v["perplexity"]),
                    "kl_teacher_model": fmt(v["kl_teacher_model"]),
                    "top1_agreement": fmt(v["top1_agreement"]),
                    "tokens": v["tokens"],
                }
                for lang, v in langs.items()
            ]
            (tmp / PERPLEXITY_DIR / f"{name}.csv").write_text(csv_text(rows), "utf-8")
        rows = [
            {
                "model": name,
                "weights_mb": fmt(r["weights_bytes"] / 1e6),
                "perplexity": fmt(r["perplexity"]),
                "kl_teacher_model": fmt(r["kl_teacher_model"]),
                "top1_agreement": fmt(r["top1_agreement"]),
                "tokens_per_s": fmt(r["tokens_per_s"]),
                "parameters": r["parameters"],
            }
            for name, r in results.items()
        ]
        (tmp / SIZE_QUALITY).write_text(csv_text(rows), "utf-8")


def read_tsv(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of one dvclive metric file (columns: [timestamp,] step, value)."""
    lines = path.read_text("utf-8").splitlines()
    header = lines[0].split("\t")
    i_step = header.index("step")
    steps, values = [], []
    for line in lines[1:]:
        cells = line.split("\t")
        if len(cells) == len(header):
            steps.append(float(cells[i_step]))
            values.append(float(cells[-1]))
    return steps, values


def read_curves(curves: list[tuple[str, Path]]) -> dict[str, dict[str, tuple[list, list]]]:
    """{student: {metric: (steps, values)}} from dvclive folders (<dir>/plots/metrics/**.tsv)."""
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for name, directory in curves:
        root = Path(directory) / "plots" / "metrics"
        out[name] = {
            tsv.relative_to(root).with_suffix("").as_posix(): read_tsv(tsv)
            for tsv in sorted(root.rglob("*.tsv"))
        }
    return out


def figure_per_language(
    path: Path,
    per_language: dict[str, dict[str, dict]],
    overall: dict[str, float],
    compressed: set[str],
    colors: dict,
) -> None:
    """Grouped vertical bars, one group per language (sorted by the first model's perplexity)
    after an "all" group; compressed models hatched in the colour of their source."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(per_language)
    first = per_language[names[0]]
    langs = sorted(first, key=lambda lang: first[lang]["perplexity"])
    groups = ["all", *langs]
    n, m = len(groups), len(names)
    width = 0.84 / m
    x = np.arange(n) + np.r_[0, np.full(n - 1, 0.4)]  # a gap after "all"
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 1.2 + 0.09 * n * m + 0.15 * n)), 4.6))
    for i, name in enumerate(names):
        values = [overall[name]] + [per_language[name][lang]["perplexity"] for lang in langs]
        hatched = name in compressed
        ax.bar(
            x + (i - (m - 1) / 2) * width,
            values,
            width,
            label=name + (" (compressed)" if hatched else ""),
            color="white" if hatched else colors[name],
            edgecolor=colors[name],
            hatch="////" if hatched else None,
            linewidth=0.8 if hatched else 0,
        )
    ax.set_xticks(x, groups)
    ax.get_xticklabels()[0].set_fontweight("bold")
    ax.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_xlabel(
        "language (sorted by the first model's perplexity; tokens per language in report.md)"
    )
    style_axes(ax)
    ax.grid(False, axis="x")
    handles, labels = ax.get_legend_handles_labels()
    fig.suptitle("Perplexity by language", x=0.01, y=0.99, ha="left", fontweight="bold")
    legend_on_top(fig, handles, labels, 0.95)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_size_quality(
    path: Path, results: dict[str, dict[str, Any]], compressed: set[str], colors: dict
) -> None:
    """Four panels, each a metric against weights on disk (MB, log scale), one point per model."""
    import matplotlib.pyplot as plt

    panels = [
        ("perplexity", "validation perplexity ↓", 1.0),
        ("kl_teacher_model", "KL(teacher ‖ model), nats/token ↓", 1.0),
        ("top1_agreement", "top-1 agreement with teacher, % ↑", 100.0),
        ("tokens_per_s", "throughput, thousand tokens/s ↑", 1e-3),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 7.4), sharex=True)
    handles = {}
    for ax, (key, label, scale) in zip(axes.flat, panels, strict=True):
        for name, r in results.items():
            hollow = name in compressed
            handles[name] = ax.scatter(
                r["weights_bytes"] / 1e6,
                r[key] * scale,
                s=80,
                marker="o" if not hollow else "D",
                color="white" if hollow else colors[name],
                edgecolors=colors[name],
                linewidths=2,
                zorder=3,
            )
        log_size_axis(ax)
        ax.set_title(label, loc="left", fontsize=10)
        style_axes(ax)
        ax.margins(x=0.3, y=0.18)
    for ax in axes[1]:
        ax.set_xlabel("weights on disk (MB, log scale)")
    fig.suptitle("Size vs quality", x=0.01, y=0.99, ha="left", fontweight="bold")
    labels = [n + (" (compressed)" if n in compressed else "") for n in handles]
    legend_on_top(fig, list(handles.values()), labels, 0.965)
    fig.tight_layout(rect=(0, 0, 1, 0.935))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_curves(
    path: Path,
    curves: dict[str, dict[str, tuple]],
    colors: dict,
    references: dict[str, float],
) -> bool:
    """Training curves side by side (one panel per metric, one line per student); the final
    perplexity of evaluated models without curves (the teacher) as dashed lines. False if none."""
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in CURVE_METRICS if any(k in c for c in curves.values())]
    if not any(k == "train/ce" for k, _ in metrics) and any(
        FALLBACK_CURVE[0] in c for c in curves.values()
    ):
        metrics.insert(0, FALLBACK_CURVE)
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.9 * len(metrics), 4.0), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for name, series in curves.items():
            if key in series:
                steps, values = series[key]
                style = "o-" if len(steps) <= 12 else "-"
                (handles[name],) = ax.plot(
                    steps, values, style, color=colors.get(name), markersize=4, linewidth=1.8
                )
        if key == "val/perplexity":
            for name, value in references.items():
                handles[f"{name} (evaluate)"] = ax.axhline(
                    value, color=colors.get(name, "0.4"), linestyle="--", linewidth=1.2
                )
        ax.set_xlabel("step")
        ax.set_title(label, loc="left", fontsize=10)
        style_axes(ax)
    fig.suptitle("Training curves (dvclive)", x=0.01, y=0.99, ha="left", fontweight="bold")
    legend_on_top(fig, list(handles.values()), list(handles), 0.94)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _kl(value: float) -> str:
    """KL for reading: an unbiased estimate can be slightly negative; show -0.0000 as 0.0000."""
    return f"{0.0 if abs(value) < 5e-5 else value:.4f}"


def markdown(
    result: dict[str, Any],
    per_language: dict[str, dict[str, dict]],
    compressed: set[str],
    has_curves: bool,
) -> str:
    """The report's Markdown (figures linked by relative path)."""
    models, store, val, thr = (
        result["models"],
        result["store"],
        result["validation"],
        result["throughput"],
    )
    names = list(models)
    estimator = (
        "an unbiased estimate from the k stored teacher draws per position"
        if store["method"] == "sample"
        else "exact between teacher and model coarsened onto the stored top-k ids plus one tail "
        "class: a lower bound of the full KL"
    )
    lines = [
        "# Evaluation: teacher, students and compressed students",
        "",
        f"Validation split: {val['sequences']:,} sequences of {val['seq_len']} tokens, "
        f"{val['positions']:,} scored positions, {val['languages']} languages. Soft labels: "
        f"`{store['method']}` store, k = {store['k']}, " + _coverage(store),
        "",
        "| model | parameters | nonzero | weights on disk | folder on disk | perplexity ↓ "
        "| KL(teacher ‖ model) ↓ | top-1 agreement ↑ | tokens/s ↑ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        r = models[name]
        tag = " (compressed)" if name in compressed else ""
        lines.append(
            f"| {name}{tag} | {r['parameters']:,} | {r['nonzero_parameters']:,} | "
            f"{mb(r['weights_bytes'])} | {mb(r['size_bytes'])} | {r['perplexity']:.2f} | "
            f"{_kl(r['kl_teacher_model'])} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    lines += [
        "",
        f"KL(teacher ‖ model) is {estimator}; top-1 agreement compares the model's argmax with "
        "the teacher's most probable stored id"
        + (
            " (for a sample store, the most probable of the k draws: it misses the teacher's "
            "argmax when no draw hit it, so the proxy is noisy where the teacher is flat"
            + "".join(
                f"; `{n}` (KL ≈ 0: the teacher) scores {100 * r['top1_agreement']:.1f}% "
                "against its own draws, the ceiling of this proxy here"
                for n, r in models.items()
                if abs(r["kl_teacher_model"]) < 1e-3
            )
            + ")."
            if store["method"] == "sample"
            else "."
        ),
        f"Throughput: the same batch of {thr['batch_sequences']} × {val['seq_len']} tokens for "
        f"every model, {thr['repeats']} interleaved timed rounds after a warm-up, fastest round, "
        f"{thr['threads']} torch threads, compressed models run with the "
        f"`{thr['int8_kernel']}` int8 kernel. Timings on a shared machine are noisy: compare "
        "models within one report, not across runs.",
        "",
        "## Perplexity by language",
        "",
        f"![Perplexity by language]({FIG_LANG})",
        "",
        "## Size vs quality",
        "",
        f"![Size vs quality]({FIG_SIZE})",
        "",
    ]
    if has_curves:
        lines += ["## Training curves", "", f"![Training curves]({FIG_CURVES})", ""]
    langs = list(per_language[names[0]])
    lines += [
        "## Per-language table (perplexity)",
        "",
        "| language | tokens | " + " | ".join(names) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for lang in langs:
        tokens = per_language[names[0]][lang]["tokens"]
        cells = " | ".join(f"{per_language[n][lang]['perplexity']:.2f}" for n in names)
        lines.append(f"| {lang} | {tokens:,} | {cells} |")
    lines.append("")
    return "\n".join(lines)


def write_report(
    report_dir: Path,
    result: dict[str, Any],
    per_language: dict[str, dict[str, dict]],
    *,
    compressed: set[str],
    derived: dict[str, str],
    curves: dict[str, dict[str, tuple]],
) -> None:
    """Write report.md and its figures into `report_dir`, replacing it atomically."""
    import matplotlib

    matplotlib.use("Agg")
    models = result["models"]
    names = list(models)
    colors = model_colors(names + [c for c in curves if c not in names], derived)
    overall = {name: r["perplexity"] for name, r in models.items()}
    references = {  # evaluated, not compressed, no curves of its own: the teacher(s)
        name: r["perplexity"]
        for name, r in models.items()
        if name not in curves and name not in compressed
    }
    with atomic_dir(report_dir) as tmp:
        figure_per_language(tmp / FIG_LANG, per_language, overall, compressed, colors)
        figure_size_quality(tmp / FIG_SIZE, models, compressed, colors)
        has_curves = (
            figure_curves(tmp / FIG_CURVES, curves, colors, references) if curves else False
        )
        text = markdown(result, per_language, compressed, has_curves)
        (tmp / "report.md").write_text(text, "utf-8")
