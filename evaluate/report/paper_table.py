"""The SCORE paper's headline table: reported vs reproduced AutoAttack numbers for the four releases.

Reported numbers come from the registry (the authors' / RobustBench's figures); reproduced ones from the
latest finished AutoAttack-standard record per row. Missing rows and subset runs are labelled, so a
half-done reproduction can never pass for a full one.

In Python the table is a pandas DataFrame::

    from zoo.evaluate.report.paper_table import build_paper_table
    frame = build_paper_table("results").to_frame()
    # dataset, model, threat, eps, clean_reported, clean_ours, clean_delta, robust_reported, robust_ours,
    # robust_delta, clean_ci_low, clean_ci_high, robust_ci_low, robust_ci_high (floats in %, NA where not
    # reproduced yet; the exact 95% Clopper-Pearson interval of ours), n_ex (nullable int), status, run_id,
    # provenance (of the evaluated checkpoint)
    frame[frame.robust_delta.abs() > 0.5]

Only runs on a released checkpoint (provenance ``pinned`` or ``local-release``, ``zoo.pins.RELEASED``) count as
reproductions. The latest run on other weights (a local file, a first-use download, a record older than
provenance) gets a row of its own after the paper's row, labelled "unverified weights ... not counted",
with no Δ; the notes say for each run "released checkpoint (sha256 …)" or that it was not verified.

Printed, a full row shows Δ = ours − reported; a partial row (fewer than all 10000 test points) shows the 95%
interval of our number in the Δ column instead, since a subset's difference alone says little.

``to_markdown`` / ``to_latex`` render it through :mod:`.tables` (pandas' ``to_markdown`` and Styler ``to_latex``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from zoo.registry import info

from . import tables
from .leaderboard import DATASET_LABEL, UNRELIABLE_MARK, latest_runs, load_records
from .model_info import FULL_TEST_SET, checkpoint_statement, format_eps, is_partial, is_released
from ..record import RunRecord

PAPER_MODELS = ("score-wrn-28-10", "score-wrn-70-16")
PAPER_DATASETS = ("cifar10", "cifar100")
PAPER_THREAT = "linf"


class Evaluation(NamedTuple):
    """One evaluation the paper table needs (what ``zoo-eval --suite paper`` runs)."""

    model: str
    dataset: str
    threat: str
    eps: str


def paper_suite() -> list[Evaluation]:
    """The released SCORE checkpoints of the paper's table, at the eps the registry rates them."""
    return [Evaluation(model, dataset, PAPER_THREAT, info(model).variant(dataset, PAPER_THREAT).eps)
            for dataset in PAPER_DATASETS for model in PAPER_MODELS]


@dataclass(frozen=True)
class PaperRow:
    evaluation: Evaluation
    reported_clean: float
    reported_robust: float
    record: RunRecord | None
    unverified: bool = False         # a run on weights that are not a released checkpoint: shown, not counted

    @property
    def status(self) -> str:
        if self.record is None:
            return "not yet reproduced"
        if self.unverified:
            return f"unverified weights ({self.record.checkpoint.get('provenance') or 'provenance not recorded'}), " \
                   "not counted"
        mark = UNRELIABLE_MARK if self.record.unreliable else ""
        if is_partial(self.record):
            full = FULL_TEST_SET.get(self.evaluation.dataset, "?")
            return f"partial (n={self.record.n_ex} of {full}){mark}"
        return "full test set" + mark


@dataclass
class PaperTable:
    rows: list[PaperRow]
    warnings: list[str]

    @property
    def notes(self) -> list[str]:
        notes = ["Reported: Pang et al., ICML 2022 (as listed by RobustBench). Ours: AutoAttack standard, "
                 "latest finished run per row. Δ = ours − reported, in percentage points."]
        if any(row.record is not None and is_partial(row.record) for row in self.rows):
            notes.append("Partial rows (a subset of the test set) show [low, high], the exact 95% (Clopper-Pearson) "
                         "interval of our number, in place of Δ.")
        if any(row.unverified for row in self.rows):
            notes.append("Rows marked 'unverified weights' evaluated a checkpoint that was not verified against a "
                         "release (provenance not pinned or local-release): shown, but not counted as reproductions.")
        unreliable = [row for row in self.rows if row.record is not None and row.record.unreliable]
        if unreliable:
            notes.append(f"{UNRELIABLE_MARK.strip()} unreliable evaluation: reliability check(s) fired ("
                         + "; ".join(f"{row.evaluation.model} on {DATASET_LABEL[row.evaluation.dataset]}: "
                                     + ", ".join(row.record.unreliable_because) for row in unreliable)
                         + "); the robust accuracy may be overestimated.")
        for row in self.rows:
            if row.record is not None:
                ev, r = row.evaluation, row.record
                notes.append(f"{ev.model} on {DATASET_LABEL[ev.dataset]}: run {r.run_id}, seed {r.seed}, "
                             f"n={r.n_ex}, {r.created}; {checkpoint_statement(r)}.")
        return notes

    def to_frame(self) -> pd.DataFrame:
        """One row per evaluation of the paper (columns: ``FRAME_COLUMNS``), in the paper's order."""
        return _frame(self)


def build_paper_table(results_dir: str | Path | None) -> PaperTable:
    loaded = load_records(results_dir) if results_dir is not None else None
    records = loaded.records if loaded else []
    released = [r for r in records if is_released(r)]   # only released checkpoints reproduce the paper
    others = [r for r in records if not is_released(r)]
    rows = []
    for ev in paper_suite():
        variant = info(ev.model).variant(ev.dataset, ev.threat)
        reported = variant.reported["clean_acc"], variant.reported["autoattack_acc"]
        match = latest_runs(released, ev.dataset, ev.threat, variant.eps_value).get(ev.model)
        rows.append(PaperRow(ev, *reported, match))
        other = latest_runs(others, ev.dataset, ev.threat, variant.eps_value).get(ev.model)
        if other is not None:
            rows.append(PaperRow(ev, *reported, other, unverified=True))
    return PaperTable(rows=rows, warnings=loaded.warnings if loaded else [])


#: The columns of ``PaperTable.to_frame()``: accuracies in %, NA where a row is not reproduced yet.
FRAME_COLUMNS = ("dataset", "model", "threat", "eps", "clean_reported", "clean_ours", "clean_delta",
                 "robust_reported", "robust_ours", "robust_delta", "clean_ci_low", "clean_ci_high", "robust_ci_low",
                 "robust_ci_high", "n_ex", "status", "run_id", "provenance", "unreliable")
_FLOAT_COLUMNS = FRAME_COLUMNS[4:14]

HEADERS = ["Dataset", "Model", "eps", "Clean (paper)", "Clean (ours)", "Δ clean", "AA (paper)", "AA (ours)",
           "Δ AA", "n", "Status"]
ALIGNS = "llcrrrrrrrl"
TITLE = "SCORE (ICML 2022): reported vs reproduced"


def _frame(table: PaperTable) -> pd.DataFrame:
    rows = []
    for row in table.rows:
        ev, r = row.evaluation, row.record
        clean, robust = (r.clean.percent, r.robust.percent) if r else (None, None)
        counted = r is not None and not row.unverified   # an unverified run's numbers get no Δ
        eps = format_eps(info(ev.model).variant(ev.dataset, ev.threat).eps_value, ev.threat)
        rows.append((ev.dataset, ev.model, ev.threat, eps,
                     row.reported_clean, clean, clean - row.reported_clean if counted else None,
                     row.reported_robust, robust, robust - row.reported_robust if counted else None,
                     *(r.clean.interval if r else (None, None)), *(r.robust.interval if r else (None, None)),
                     r.n_ex if r else None, row.status, r.run_id if r else None,
                     r.checkpoint.get("provenance") if r else None, bool(r and r.unreliable)))
    frame = pd.DataFrame.from_records(rows, columns=list(FRAME_COLUMNS))
    return frame.astype({c: "float64" for c in _FLOAT_COLUMNS} | {"n_ex": "Int64"})


def _display(table: PaperTable) -> pd.DataFrame:
    """The frame as printed: two decimals, signed differences, ``—`` for what is not measured yet."""
    frame = table.to_frame()

    def number(fmt: str):
        return lambda v: "—" if pd.isna(v) else format(v, fmt)

    full = FULL_TEST_SET.get
    partial = [not pd.isna(n) and n < full(d, 0) for n, d in zip(frame["n_ex"], frame["dataset"])]

    def delta_or_interval(kind: str) -> list[str]:
        # full rows: the difference to the paper; partial rows: the 95% interval of ours instead
        return [f"[{lo:.2f}, {hi:.2f}]" if part else number("+.2f")(delta)
                for part, delta, lo, hi in zip(partial, frame[f"{kind}_delta"], frame[f"{kind}_ci_low"],
                                               frame[f"{kind}_ci_high"])]

    columns = [frame["dataset"].map(lambda d: DATASET_LABEL.get(d, d)), frame["model"], frame["eps"]]
    for kind in ("clean", "robust"):
        columns += [frame[f"{kind}_reported"].map(number(".2f")), frame[f"{kind}_ours"].map(number(".2f")),
                    pd.Series(delta_or_interval(kind), dtype=object)]
    columns += [frame["n_ex"].map(number("d")), frame["status"]]
    return pd.DataFrame(dict(zip(HEADERS, (list(c) for c in columns))), columns=HEADERS)


def to_markdown(table: PaperTable) -> str:
    return tables.markdown(_display(table), ALIGNS, table.notes, title=TITLE)


def to_latex(table: PaperTable) -> str:
    return tables.latex(_display(table), ALIGNS, table.notes, caption=TITLE)


RENDERERS = {"md": to_markdown, "latex": to_latex}
