"""What `classify_evaluate` writes for people and for DVC: plot tables, matplotlib figures, report.

- Plot tables (`dvc plots show` / `dvc plots diff`), one file per model so the dvc.yaml plot
  definitions do not depend on the model names: `<plots>/accuracy/<model>.csv` (lang, labeled,
  accuracy, macro_f1, examples), `<plots>/per_class/<model>.csv` (group, label, precision,
  recall, f1, support; groups `all`, `labeled`, `unlabeled`), `<plots>/confusion/<model>.csv`
  (one row per scored test row: lang, actual, predicted label names, for DVC's `confusion`
  template; only the models asked for), and `<plots>/size_accuracy.csv` (one row per model).
- Figures (PNG, matplotlib's Agg backend): accuracy by language per model (means over the
  labeled and the unlabeled languages first, chance and majority-class lines), size vs accuracy
  and throughput, and a confusion matrix per model asked for (labeled and unlabeled languages'
  rows side by side, each row normalised to the class's recall, counts written in the cells).
- `report.md` next to the figures, linking them relatively, so the folder is self-contained.

Colours, number formats and CSV text come from `pipeline.evaluate.common`, shared with the LM
report: each model keeps one colour in every figure (argv order), a compressed model the colour
of the model it was made from, hatched or hollow. Accuracies are fractions in the tables and the
metrics JSON, percentages in the report and figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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

if TYPE_CHECKING:
    from pipeline.classify.evaluate import Evaluation

ACCURACY_DIR = "accuracy"
PER_CLASS_DIR = "per_class"
CONFUSION_DIR = "confusion"
SIZE_ACCURACY = "size_accuracy.csv"
FIG_LANG = "accuracy_by_language.png"
FIG_SIZE = "size_vs_accuracy.png"
GROUP_TITLES = {"labeled": "labeled languages", "unlabeled": "unlabeled languages (transfer)"}


def confusion_figure_name(model: str) -> str:
    """File name of a model's confusion-matrix figure."""
    return f"confusion_{model}.png"


def write_plot_tables(plots: Path, ev: Evaluation, *, confusion: list[str]) -> None:
    """Write the DVC plot tables (module docstring) into `plots`, replacing it atomically."""
    labeled = set(ev.labeled)
    with atomic_dir(plots) as tmp:
        for sub in (ACCURACY_DIR, PER_CLASS_DIR, CONFUSION_DIR):
            (tmp / sub).mkdir()
        for name, scores in ev.scores.items():
            rows = [
                {
                    "lang": lang,
                    "labeled": "yes" if lang in labeled else "no",
                    "accuracy": fmt(v["accuracy"]),
                    "macro_f1": fmt(v["macro_f1"]),
                    "examples": v["examples"],
                }
                for lang, v in scores.per_language.items()
            ]
            (tmp / ACCURACY_DIR / f"{name}.csv").write_text(csv_text(rows), "utf-8")
            rows = [
                {
                    "group": group,
                    "label": r["label"],
                    "precision": fmt(r["precision"]),
                    "recall": fmt(r["recall"]),
                    "f1": fmt(r["f1"]),
                    "support": r["support"],
                }
                for group, table in scores.per_class.items()
                for r in table
            ]
            (tmp / PER_CLASS_DIR / f"{name}.csv").write_text(csv_text(rows), "utf-8")
        for name in confusion:
            rows = [
                {"lang": lang, "actual": ev.labels[g], "predicted": ev.labels[p]}
                for lang, g, p in zip(
                    ev.lang.tolist(), ev.gold.tolist(), ev.predictions[name].tolist(), strict=True
                )
            ]
            (tmp / CONFUSION_DIR / f"{name}.csv").write_text(csv_text(rows), "utf-8")
        rows = [
            {
                "model": name,
                "weights_mb": fmt(r["weights_bytes"] / 1e6),
                "accuracy": fmt(r["accuracy"]),
                "accuracy_labeled": fmt(r.get("accuracy_labeled", float("nan"))),
                "accuracy_unlabeled": fmt(r.get("accuracy_unlabeled", float("nan"))),
                "macro_f1": fmt(r["macro_f1"]),
                "examples_per_s": fmt(r["examples_per_s"]),
                "parameters": r["parameters"],
            }
            for name, r in ev.metrics["models"].items()
        ]
        (tmp / SIZE_ACCURACY).write_text(csv_text(rows), "utf-8")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def figure_accuracy_by_language(path: Path, ev: Evaluation, colors: dict) -> None:
    """Grouped vertical bars: the labeled and unlabeled means, then each labeled language, then
    each unlabeled one (sorted by the first model's accuracy); chance and majority as lines."""
    import matplotlib.pyplot as plt

    names = list(ev.scores)
    first = ev.scores[names[0]].per_language
    unlabeled = sorted(ev.unlabeled, key=lambda x: -first[x]["accuracy"])
    means = [g for g in ("labeled", "unlabeled") if getattr(ev, g)]
    groups = [f"{g}\nmean" for g in means] + ev.labeled + unlabeled
    gaps = np.zeros(len(groups))  # a gap after the means and after the labeled languages
    gaps[len(means) :] += 0.5
    gaps[len(means) + len(ev.labeled) :] += 0.5 if ev.labeled and unlabeled else 0.0
    x = np.arange(len(groups)) + gaps
    n, m = len(groups), len(names)
    width = 0.84 / m
    fig, ax = plt.subplots(figsize=(min(15.0, max(8.0, 1.6 + 0.08 * n * m + 0.2 * n)), 4.8))
    for i, name in enumerate(names):
        s = ev.scores[name]
        values = [s.summary[f"accuracy_{g}"] for g in means]
        values += [s.per_language[lang]["accuracy"] for lang in ev.labeled + unlabeled]
        hatched = name in ev.compressed
        ax.bar(
            x + (i - (m - 1) / 2) * width,
            100 * np.asarray(values),
            width,
            label=name + (" (compressed)" if hatched else ""),
            color="white" if hatched else colors[name],
            edgecolor=colors[name],
            hatch="////" if hatched else None,
            linewidth=0.8 if hatched else 0,
        )
    handles, labels = ax.get_legend_handles_labels()
    test = ev.metrics["test"]
    for value, label, style in (
        (test["chance_accuracy"], "chance", ":"),
        (test["majority_class_accuracy"], "majority class", "--"),
    ):
        ax.axhline(100 * value, color="0.35", linestyle=style, linewidth=1.0)
        ax.annotate(
            label,
            (1.0, 100 * value),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="0.35",
        )
    ax.set_xticks(x, groups)
    for tick in ax.get_xticklabels()[: len(means)]:
        tick.set_fontweight("bold")
    ax.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy, % (higher is better)")
    ax.set_xlabel("language: labeled, then unlabeled (sorted by the first model's accuracy)")
    style_axes(ax)
    ax.grid(False, axis="x")
    fig.suptitle("Accuracy by language", x=0.01, y=0.99, ha="left", fontweight="bold")
    legend_on_top(fig, handles, labels, 0.95)
    fig.tight_layout(rect=(0, 0, 0.97, 0.86 if len(labels) > 5 else 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_size_accuracy(path: Path, ev: Evaluation, colors: dict) -> None:
    """Panels sharing the size axis (weights on disk, MB, log): accuracy on the labeled and the
    unlabeled languages, and throughput; one point per model."""
    import matplotlib.pyplot as plt

    results = ev.metrics["models"]
    panels = [
        (f"accuracy_{g}", f"accuracy, {GROUP_TITLES[g]}, % ↑", 100.0)
        for g in ("labeled", "unlabeled")
        if getattr(ev, g)
    ] + [("examples_per_s", "throughput, thousand examples/s ↑", 1e-3)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.0), squeeze=False)
    handles = {}
    for ax, (key, label, scale) in zip(axes[0], panels, strict=True):
        for name, r in results.items():
            hollow = name in ev.compressed
            handles[name] = ax.scatter(
                r["weights_bytes"] / 1e6,
                r[key] * scale,
                s=80,
                marker="D" if hollow else "o",
                color="white" if hollow else colors[name],
                edgecolors=colors[name],
                linewidths=2,
                zorder=3,
            )
        log_size_axis(ax)
        ax.set_xlabel("weights on disk (MB, log scale)")
        ax.set_title(label, loc="left", fontsize=10)
        style_axes(ax)
        ax.margins(x=0.3, y=0.18)
    fig.suptitle("Size vs accuracy", x=0.01, y=0.99, ha="left", fontweight="bold")
    labels = [n + (" (compressed)" if n in ev.compressed else "") for n in handles]
    legend_on_top(fig, list(handles.values()), labels, 0.94)
    fig.tight_layout(rect=(0, 0, 1, 0.84))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_confusion(path: Path, name: str, ev: Evaluation) -> None:
    """One panel per row group (labeled, unlabeled languages): rows = gold class, columns =
    predicted; colour = share of the gold class's rows (recall on the diagonal), counts in the
    cells."""
    import matplotlib.pyplot as plt

    matrices = {g: cm for g, cm in ev.scores[name].confusion.items() if g != "all"}
    c = len(ev.labels)
    fig, axes = plt.subplots(
        1,
        len(matrices),
        figsize=(2.2 + 0.55 * c * len(matrices) + 0.8, 0.46 * c + 1.9),
        layout="constrained",
    )
    axes = np.atleast_1d(axes)
    image = None
    for ax, (group, cm) in zip(axes, matrices.items(), strict=True):
        support = cm.sum(axis=1, keepdims=True)  # (C, 1)
        share = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)  # (C, C)
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(c):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.6 else "0.15",
                )
        ax.set_xticks(range(c), ev.labels, rotation=40, ha="right", fontsize=8.5)
        ax.set_yticks(range(c), ev.labels if ax is axes[0] else [], fontsize=8.5)
        ax.set_xlabel("predicted")
        if ax is axes[0]:
            ax.set_ylabel("gold")
        langs = getattr(ev, group)
        count = f"{len(langs)} languages" if len(langs) > 3 else ", ".join(langs)
        acc = np.trace(cm) / max(int(cm.sum()), 1)
        ax.set_title(
            f"{GROUP_TITLES[group]}: {count}\naccuracy {100 * acc:.1f}%", loc="left", fontsize=9.5
        )
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the gold class's rows")
    tag = " (compressed)" if name in ev.compressed else ""
    fig.suptitle(f"Confusion matrix: {name}{tag}", x=0.01, ha="left", fontweight="bold")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(ev: Evaluation, confusion: list[str]) -> str:
    """The report's Markdown (figures linked by relative path)."""
    models, test, thr = ev.metrics["models"], ev.metrics["test"], ev.metrics["throughput"]
    names = list(models)
    labeled = ", ".join(ev.labeled) or "none"
    lines = [
        "# Classification: teacher, students and compressed students on test",
        "",
        f"Test split: {test['examples']:,} labeled examples in {test['languages']} languages "
        f"({len(ev.labeled)} labeled: {labeled}, whose gold labels the models trained on; "
        f"{len(ev.unlabeled)} unlabeled, reached by cross-lingual transfer), "
        f"{test['classes']} classes. Chance {_pct(test['chance_accuracy'])}, majority class "
        f"{_pct(test['majority_class_accuracy'])}. Model selection used dev; nothing here "
        "reads dev.",
        "",
        "| model | parameters | nonzero | weights on disk | folder on disk "
        f"| accuracy, labeled ({labeled}) ↑ | accuracy, unlabeled (mean of {len(ev.unlabeled)}) ↑ "
        f"| accuracy, all (mean of {test['languages']}) ↑ | macro-F1, unlabeled ↑ "
        "| examples/s ↑ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        r = models[name]
        tag = " (compressed)" if name in ev.compressed else ""
        lines.append(
            f"| {name}{tag} | {r['parameters']:,} | {r['nonzero_parameters']:,} | "
            f"{mb(r['weights_bytes'])} | {mb(r['size_bytes'])} | "
            f"{_pct(r.get('accuracy_labeled'))} | {_pct(r.get('accuracy_unlabeled'))} | "
            f"{_pct(r['accuracy'])} | {_pct(r.get('macro_f1_unlabeled'))} | "
            f"{r['examples_per_s']:,.0f} |"
        )
    lines.append("")
    for name, source in ev.derived.items():
        a, b = models[name], models[source]
        parts = [f"`{name}` vs `{source}`: weights {a['weights_bytes'] / b['weights_bytes']:.2f}x"]
        for key, what in (("accuracy_labeled", "labeled"), ("accuracy_unlabeled", "unlabeled")):
            if key in a and key in b:
                parts.append(f"accuracy {what} {100 * (a[key] - b[key]):+.1f} points")
        lines += ["; ".join(parts) + ".", ""]
    lines += [
        "Accuracy and macro-F1 are computed per language and averaged over languages (each "
        "language counts once). Macro-F1 averages the per-class F1 over the classes present in "
        "a language's gold labels or predictions. "
        f"Throughput: the same {thr['batch_examples']} test texts (spread over every language) "
        f"for every model, each tokenized with the model's own tokenizer before timing (at most "
        f"{thr['max_length']} tokens), {thr['repeats']} interleaved timed rounds after a "
        f"warm-up, fastest round, {thr['threads']} torch threads, compressed models run with "
        f"the `{thr['int8_kernel']}` int8 kernel. Timings on a shared machine are noisy: "
        "compare models within one report, not across runs.",
        "",
        "## Accuracy by language",
        "",
        f"![Accuracy by language]({FIG_LANG})",
        "",
        "## Size vs accuracy",
        "",
        f"![Size vs accuracy]({FIG_SIZE})",
        "",
    ]
    if confusion:
        lines += ["## Confusion matrices", ""]
        for name in confusion:
            lines += [f"![Confusion matrix: {name}]({confusion_figure_name(name)})", ""]
    labeled_set = set(ev.labeled)
    lines += [
        "## Per-language accuracy",
        "",
        "| language | examples | " + " | ".join(names) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    first = ev.scores[names[0]].per_language
    for lang in first:
        cells = " | ".join(_pct(ev.scores[n].per_language[lang]["accuracy"]) for n in names)
        tag = " (labeled)" if lang in labeled_set else ""
        lines.append(f"| {lang}{tag} | {first[lang]['examples']:,} | {cells} |")
    lines += [
        "",
        "## Per-class precision / recall (all test rows)",
        "",
        "Each cell: precision / recall, in %. The plot tables (`per_class/<model>.csv`) also "
        "hold them for the labeled and the unlabeled languages' rows apart.",
        "",
        "| class | gold rows | " + " | ".join(names) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    tables = {n: ev.scores[n].per_class["all"] for n in names}
    for i, label in enumerate(ev.labels):
        cells = " | ".join(
            f"{100 * tables[n][i]['precision']:.0f} / {100 * tables[n][i]['recall']:.0f}"
            for n in names
        )
        lines.append(f"| {label} | {tables[names[0]][i]['support']:,} | {cells} |")
    lines.append("")
    return "\n".join(lines)


def write_report(report_dir: Path, ev: Evaluation, *, confusion: list[str]) -> None:
    """Write report.md and its figures into `report_dir`, replacing it atomically."""
    import matplotlib

    matplotlib.use("Agg")
    colors = model_colors(list(ev.scores), ev.derived)
    with atomic_dir(report_dir) as tmp:
        figure_accuracy_by_language(tmp / FIG_LANG, ev, colors)
        figure_size_accuracy(tmp / FIG_SIZE, ev, colors)
        for name in confusion:
            figure_confusion(tmp / confusion_figure_name(name), name, ev)
        (tmp / "report.md").write_text(markdown(ev, confusion), "utf-8")
