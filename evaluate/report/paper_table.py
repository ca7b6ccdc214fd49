"""The SCORE paper's headline table: reported vs reproduced AutoAttack numbers for the four releases.

Reported numbers come from the registry (the authors' / RobustBench's figures); reproduced ones from the
latest finished AutoAttack-standard record per row. Missing rows and subset runs are labelled, so a
half-done reproduction can never pass for a full one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from zoo.registry import info

from .leaderboard import DATASET_LABEL, latest_runs, latex_table, load_records, markdown_table
from .model_info import FULL_TEST_SET, format_eps, is_partial
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

    @property
    def status(self) -> str:
        if self.record is None:
            return "not yet reproduced"
        if is_partial(self.record):
            full = FULL_TEST_SET.get(self.evaluation.dataset, "?")
            return f"partial (n={self.record.n_ex} of {full})"
        return "full test set"


@dataclass
class PaperTable:
    rows: list[PaperRow]
    warnings: list[str]

    @property
    def notes(self) -> list[str]:
        notes = ["Reported: Pang et al., ICML 2022 (as listed by RobustBench). Ours: AutoAttack standard, "
                 "latest finished run per row. Δ = ours − reported, in percentage points."]
        for row in self.rows:
            if row.record is not None:
                ev, r = row.evaluation, row.record
                notes.append(f"{ev.model} on {DATASET_LABEL[ev.dataset]}: run {r.run_id}, seed {r.seed}, "
                             f"n={r.n_ex}, {r.created}.")
        return notes


def build_paper_table(results_dir: str | Path | None) -> PaperTable:
    loaded = load_records(results_dir) if results_dir is not None else None
    records = loaded.records if loaded else []
    rows = []
    for ev in paper_suite():
        variant = info(ev.model).variant(ev.dataset, ev.threat)
        match = latest_runs(records, ev.dataset, ev.threat, variant.eps_value).get(ev.model)
        rows.append(PaperRow(ev, variant.reported["clean_acc"], variant.reported["autoattack_acc"], match))
    return PaperTable(rows=rows, warnings=loaded.warnings if loaded else [])


HEADERS = ["Dataset", "Model", "eps", "Clean (paper)", "Clean (ours)", "Δ clean", "AA (paper)", "AA (ours)",
           "Δ AA", "n", "Status"]


def _cells(row: PaperRow, dash: str) -> list[str]:
    ev, r = row.evaluation, row.record

    def measured(ours: float | None, reported: float) -> list[str]:
        if ours is None:
            return [f"{reported:.2f}", dash, dash]
        return [f"{reported:.2f}", f"{ours:.2f}", f"{ours - reported:+.2f}"]

    eps = format_eps(info(ev.model).variant(ev.dataset, ev.threat).eps_value, ev.threat)
    return [DATASET_LABEL[ev.dataset], ev.model, eps,
            *measured(r.clean.percent if r else None, row.reported_clean),
            *measured(r.robust.percent if r else None, row.reported_robust),
            str(r.n_ex) if r else dash, row.status]


def to_markdown(table: PaperTable) -> str:
    rows = [_cells(row, "—") for row in table.rows]
    return "### SCORE (ICML 2022): reported vs reproduced\n\n" + markdown_table(
        HEADERS, "llcrrrrrrrl", rows, table.notes)


def to_latex(table: PaperTable) -> str:
    rows = [_cells(row, "—") for row in table.rows]
    return latex_table(HEADERS, "llcrrrrrrrl", rows, table.notes,
                       caption="SCORE (ICML 2022): reported vs reproduced")


RENDERERS = {"md": to_markdown, "latex": to_latex}
