"""Figures for the paper and the README: attack stages, clean-vs-robust scatter, robust accuracy vs eps, and the
corruption x severity heat map of a corruptions run.

matplotlib is an optional extra, imported only here and only when a plot is asked for. We build Figures
directly (no pyplot) so nothing touches global backend state, and size them for one paper column
(3.5 in wide) with every font at least 8 pt.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from zoo.errors import BadInputError, ZooError
from zoo.fileio import atomic_write_bytes

from .leaderboard import DATASET_LABEL, Leaderboard, canonical_model, latest_runs
from .model_info import ROBUSTBENCH_THREAT, format_eps, same_eps
from ..record import RunRecord

WIDTH_IN, HEIGHT_IN, DPI = 3.5, 2.6, 300
MIN_FONT_PT = 8
STYLE = {"font.size": MIN_FONT_PT, "axes.titlesize": 9, "axes.labelsize": MIN_FONT_PT,
         "xtick.labelsize": MIN_FONT_PT, "ytick.labelsize": MIN_FONT_PT, "legend.fontsize": MIN_FONT_PT,
         "lines.linewidth": 1.2, "lines.markersize": 4, "svg.hashsalt": "score-zoo"}
SCORE_COLOR, OTHER_COLOR = "#d95f02", "#7f7f7f"


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (fails early if the install is broken)
    except ImportError:
        raise ZooError("plotting needs matplotlib, which is not installed",
                       hint='pip install "score-zoo[plots]"   (or: pip install matplotlib)') from None
    return matplotlib


def _figure() -> Any:
    from matplotlib.figure import Figure
    return Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")


def output_paths(output: str | Path) -> list[Path]:
    """``<output>.png`` and ``<output>.svg`` (a .png/.svg suffix on ``output`` is dropped)."""
    base = Path(output)
    if base.suffix.lower() in (".png", ".svg"):
        base = base.with_suffix("")
    return [base.with_name(f"{base.name}.{fmt}") for fmt in ("png", "svg")]


def save(fig: Any, output: str | Path) -> list[Path]:
    """Write ``<output>.png`` and ``<output>.svg`` atomically, both rendered before either is written."""
    paths = output_paths(output)
    blobs = []
    for path in paths:
        fmt = path.suffix[1:]
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
        blobs.append(buf.getvalue())
    return [atomic_write_bytes(path, blob) for path, blob in zip(paths, blobs)]


def _legend_labels(records: list[RunRecord]) -> list[str]:
    labels = [f"{r.model} ({DATASET_LABEL.get(r.dataset, r.dataset)}, n={r.n_ex})" for r in records]
    return [f"{label} [{r.run_id}]" if labels.count(label) > 1 else label for label, r in zip(labels, records)]


def stages_figure(records: list[RunRecord]) -> Any:
    """Robust accuracy after each attack of the sequence (cumulative), one line per run."""
    matplotlib = _matplotlib()
    if not records:
        raise BadInputError("no result records to plot", hint="pass one or more record .json files")
    steps = ["clean"]
    for r in records:
        steps += [s.attack for s in r.stages if s.attack not in steps]
    with matplotlib.rc_context(STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        for r, label in zip(records, _legend_labels(records)):
            xs = [0] + [steps.index(s.attack) for s in r.stages]
            ys = [r.clean.percent] + [s.robust.percent for s in r.stages]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xticks(range(len(steps)), steps)
        ax.set_xlabel("after attack stage")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    return fig


def _short(entry: Any) -> str:
    return entry.architecture.replace("WideResNet", "WRN") if entry.architecture else entry.model_id


def scatter_figure(board: Leaderboard) -> Any:
    """Clean vs robust accuracy of a leaderboard, SCORE networks highlighted (filled: measured here,
    hollow: RobustBench's entry) and labelled once per architecture so near-identical points stay legible."""
    matplotlib = _matplotlib()
    groups = [("other models", [e for e in board.entries if not e.score],
               {"s": 12, "color": OTHER_COLOR}),
              ("SCORE (RobustBench)", [e for e in board.entries if e.score and not e.ours],
               {"s": 36, "marker": "*", "facecolors": "none", "edgecolors": SCORE_COLOR, "zorder": 3}),
              ("SCORE (this harness)", [e for e in board.entries if e.score and e.ours],
               {"s": 36, "marker": "*", "color": SCORE_COLOR, "zorder": 4})]
    with matplotlib.rc_context(STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        for label, entries, style in groups:
            if entries:
                ax.scatter([e.clean for e in entries], [e.robust for e in entries], label=label, **style)
        labelled: dict[str, Any] = {}
        for entry in groups[2][1] + groups[1][1]:  # ours first: its label wins
            labelled.setdefault(_short(entry), entry)
        ranked = sorted(labelled.items(), key=lambda kv: -kv[1].robust)
        for i, (label, entry) in enumerate(ranked):  # alternate above / below so neighbours do not collide
            ax.annotate(label, (entry.clean, entry.robust), textcoords="offset points",
                        xytext=(5, 3) if i % 2 == 0 else (5, -10), fontsize=MIN_FONT_PT)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(f"{DATASET_LABEL.get(board.dataset, board.dataset)}, "
                     f"{ROBUSTBENCH_THREAT.get(board.threat, board.threat)} ε={board.eps}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, loc="best")
    return fig


def eps_series(records: list[RunRecord], dataset: str, threat: str, models: list[str] | None = None,
               version: str = "standard") -> dict[str, list[RunRecord]]:
    """Per model, the latest finished run at each eps found, sorted by eps; models with one eps are dropped."""
    levels: list[float] = []
    for r in records:
        if (r.dataset, r.threat) == (dataset, threat) and not any(same_eps(r.eps_value, v) for v in levels):
            levels.append(r.eps_value)
    wanted = {canonical_model(m) for m in models} if models else None
    series: dict[str, list[RunRecord]] = {}
    for eps in sorted(levels):
        for model, record in latest_runs(records, dataset, threat, eps, version).items():
            if wanted is None or model in wanted:
                series.setdefault(model, []).append(record)
    found = {m: rs for m, rs in series.items() if len(rs) >= 2}
    if not found:
        have = ", ".join(f"{m} ({', '.join(format_eps(r.eps_value, threat) for r in rs)})"
                         for m, rs in sorted(series.items())) or "none"
        raise BadInputError(f"robust accuracy vs eps needs finished {dataset}/{threat} runs at two or more eps "
                            f"for a model; found: {have}", hint="run zoo-eval at several --eps values")
    return found


def eps_figure(series: dict[str, list[RunRecord]], threat: str) -> Any:
    matplotlib = _matplotlib()
    per_255 = threat == "linf"
    with matplotlib.rc_context(STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        for model, runs in sorted(series.items()):
            xs = [r.eps_value * 255 if per_255 else r.eps_value for r in runs]
            ax.plot(xs, [r.robust.percent for r in runs], marker="o", label=model)
        ax.set_xlabel("ε (×1/255)" if per_255 else "ε")
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    return fig


def corruptions_figure(record: RunRecord) -> Any:
    """Heat map of a corruptions record: accuracy (%) per corruption (rows, RobustBench's order) and severity
    1-5 (columns), each cell written in; the title gives the mean (RobustBench's corruptions_acc)."""
    matplotlib = _matplotlib()
    if record.kind != "corruptions" or not record.corruptions:
        raise BadInputError(f"run {record.run_id} is not a corruptions run (kind {record.kind!r})",
                            hint="pass a record of zoo-eval --threat corruptions")
    percent = record.corruption_percent
    names, values = list(percent), list(percent.values())
    with matplotlib.rc_context(STYLE):
        from matplotlib.figure import Figure
        fig = Figure(figsize=(WIDTH_IN, 0.22 * len(names) + 1.2), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 55 else "black")
        ax.set_xticks(range(5), [str(s) for s in range(1, 6)])
        ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names])
        ax.set_xlabel("severity")
        ax.set_title(f"{record.model}, {DATASET_LABEL.get(record.dataset, record.dataset)}-C: "
                     f"mean {record.robust.percent:.2f}%", fontsize=MIN_FONT_PT)
        fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig
