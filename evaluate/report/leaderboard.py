"""Rank result records (and RobustBench model_info files) the RobustBench way, and render the table.

Everything here refuses to mix: one table = one dataset, one threat, one eps, one AutoAttack version.
Files that cannot be trusted (malformed, unfinished) are named in ``warnings`` and left out, never
silently blended in. The record loader and the markdown/LaTeX writers are shared with the paper table.
"""

from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from zoo.errors import BadInputError, ZooError
from zoo.registry import load_registry, resolve_name

from .model_info import (FULL_TEST_SET, ROBUSTBENCH_THREAT, format_eps, is_partial, model_info_files,
                         read_model_info, same_eps)
from ..record import RunRecord

DATASET_LABEL = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


# ---------------------------------------------------------------- loading records

@dataclass
class LoadedRecords:
    records: list[RunRecord]
    warnings: list[str] = field(default_factory=list)


def unfinished_warning(path: str | Path, record: RunRecord) -> str:
    return f"{path}: unfinished run {record.run_id} (complete: false) -- excluded"


def load_records(results_dir: str | Path) -> LoadedRecords:
    """Every finished, well-formed record under ``results_dir``; the rest are named in ``warnings``."""
    root = Path(results_dir)
    if not root.is_dir():
        raise BadInputError(f"results folder {root} does not exist",
                            hint="run zoo-eval first, or point --results at the folder holding the records")
    out = LoadedRecords(records=[])
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            record = RunRecord.read(path)
        except BadInputError as exc:
            out.warnings.append(f"{exc} -- excluded")
            continue
        if not record.complete:
            out.warnings.append(unfinished_warning(path, record))
            continue
        out.records.append(record)
    return out


def canonical_model(name: str) -> str:
    """Registry name for registry models (RobustBench ids included), the label itself otherwise."""
    try:
        return resolve_name(name)
    except ZooError:
        return name


def latest_runs(records: list[RunRecord], dataset: str, threat: str, eps_value: float,
                version: str = "standard") -> dict[str, RunRecord]:
    """The newest record per model for one dataset / threat / eps / AutoAttack version; a full-test-set run
    beats any newer subset run. Records of different custom data files are never put side by side."""
    chosen = [r for r in records if (r.dataset, r.threat, r.version) == (dataset, threat, version)
              and same_eps(r.eps_value, eps_value)]
    files = {_data_identity(r) for r in chosen}
    if dataset == "custom" and len(files) > 1:
        raise BadInputError(f"custom-data records come from {len(files)} different data files "
                            f"({', '.join(sorted(f[:12] for f in files))}); one table ranks one data set",
                            hint="keep each data file's records in their own --results folder")
    latest: dict[str, RunRecord] = {}
    for record in chosen:
        model = canonical_model(record.model)
        if model not in latest or _preference(record) > _preference(latest[model]):
            latest[model] = record
    return latest


def _data_identity(record: RunRecord) -> str:
    return str(record.data.get("content_sha256") or record.data.get("sha256") or record.data.get("path"))


def _preference(record: RunRecord) -> tuple[bool, datetime, str]:
    return (not is_partial(record), *_age_key(record))


def _age_key(record: RunRecord) -> tuple[datetime, str]:
    """Creation time (a time without zone counts as UTC, so mixed spellings still compare), then run id."""
    created = datetime.fromisoformat(record.created)
    return (created if created.tzinfo else created.replace(tzinfo=timezone.utc), record.run_id)


# ---------------------------------------------------------------- the leaderboard

@dataclass(frozen=True)
class Entry:
    model_id: str
    paper: str | None
    link: str | None
    clean: float
    robust: float
    architecture: str | None
    venue: str | None
    n_ex: int | None
    source: str          # "score-zoo run <id>" or "RobustBench model_info"
    ours: bool           # measured by this harness (a result record)
    score: bool          # one of the SCORE networks in our registry (highlighted in plots)


@dataclass
class Leaderboard:
    dataset: str
    threat: str
    eps: str
    entries: list[Entry]
    notes: list[str]
    warnings: list[str]

    @property
    def title(self) -> str:
        return (f"{DATASET_LABEL.get(self.dataset, self.dataset)} "
                f"{ROBUSTBENCH_THREAT.get(self.threat, self.threat)} eps={self.eps} leaderboard")


def _entry_from_record(record: RunRecord) -> Entry:
    model = canonical_model(record.model)
    meta = load_registry().get(model)
    return Entry(model_id=model, paper=meta.paper.title if meta else None, link=meta.paper.link if meta else None,
                 clean=record.clean.percent, robust=record.robust.percent,
                 architecture=meta.architecture.label if meta else None, venue=meta.paper.venue if meta else None,
                 n_ex=record.n_ex, source=f"score-zoo run {record.run_id}", ours=True, score=meta is not None)


def _score_ids() -> set[str]:
    return {m.robustbench_id for m in load_registry().values()}


def _available_eps(loaded: list[RunRecord], published: list, dataset: str, threat: str,
                   version: str) -> list[float]:
    values: list[float] = []
    for value in [r.eps_value for r in loaded if (r.dataset, r.threat, r.version) == (dataset, threat, version)] + \
                 [p.eps_value for p in published]:
        if not any(same_eps(value, v) for v in values):
            values.append(value)
    return sorted(values)


def build_leaderboard(dataset: str, threat: str, eps: float | None = None, results_dir: str | Path | None = None,
                      model_info_dir: str | Path | None = None, version: str = "standard") -> Leaderboard:
    """Rank the latest finished run per model (+ published entries) by robust accuracy, best first."""
    warnings: list[str] = []
    records: list[RunRecord] = []
    if results_dir is not None:
        loaded = load_records(results_dir)
        records, warnings = loaded.records, loaded.warnings
    published = []
    if model_info_dir is not None:
        for path in model_info_files(Path(model_info_dir), dataset, threat):
            try:
                entry = read_model_info(path)
            except BadInputError as exc:
                warnings.append(f"{exc} -- excluded")
                continue
            if entry.data["dataset"] != dataset:
                warnings.append(f"{path}: dataset {entry.data['dataset']!r}, not {dataset!r} -- excluded")
                continue
            published.append(entry)
    candidates = _available_eps(records, published, dataset, threat, version)
    if eps is None:
        if len(candidates) > 1:
            raise BadInputError(f"{dataset}/{threat} results exist at several eps ("
                                + ", ".join(format_eps(v, threat) for v in candidates) + "); one table ranks one eps",
                                hint="pick one with --eps")
        if not candidates:
            versions = sorted({r.version for r in records if (r.dataset, r.threat) == (dataset, threat)})
            raise BadInputError(f"no AutoAttack-{version} results for {dataset}/{threat}",
                                hint=f"results exist with AutoAttack version(s) {', '.join(versions)} (pick one with "
                                "--version)" if versions else
                                "run zoo-eval first, or pass --results / --model-info folders that hold some")
        eps = candidates[0]
    label = format_eps(eps, threat)
    entries = [_entry_from_record(r) for r in latest_runs(records, dataset, threat, eps, version).values()]
    score_ids = _score_ids()
    for pub in published:
        if not same_eps(pub.eps_value, eps):
            warnings.append(f"{pub.model_id}.json: eps {pub.data['eps']}, not {label} -- excluded")
            continue
        entries.append(Entry(model_id=pub.model_id, paper=pub.data.get("name", "").strip() or None,
                             link=pub.data.get("link") or None, clean=pub.clean, robust=pub.robust,
                             architecture=pub.data.get("architecture"), venue=pub.data.get("venue") or "Unpublished",
                             n_ex=FULL_TEST_SET.get(dataset), source="RobustBench model_info", ours=False,
                             score=pub.model_id in score_ids))
    if not entries:
        others = ", ".join(format_eps(v, threat) for v in candidates if not same_eps(v, eps)) or "none"
        versions = sorted({r.version for r in records if (r.dataset, r.threat) == (dataset, threat)
                           and same_eps(r.eps_value, eps)} - {version})
        hint = f"results exist at other eps: {others}"
        if versions:
            hint += f"; at eps {label} with AutoAttack version(s) {', '.join(versions)} (pick one with --version)"
        raise BadInputError(f"no finished AutoAttack-{version} results for {dataset}/{threat} at eps {label}",
                            hint=hint)
    entries.sort(key=lambda e: (-e.robust, -e.clean, e.model_id))
    return Leaderboard(dataset=dataset, threat=threat, eps=label, entries=entries,
                       notes=_notes(entries, dataset), warnings=warnings)


def _notes(entries: list[Entry], dataset: str) -> list[str]:
    notes = []
    if any(e.ours for e in entries) and not all(e.ours for e in entries):
        notes.append("† evaluated with score-zoo (AutoAttack, this repository's result records); "
                     "other rows are RobustBench's published model_info entries.")
    sizes: dict[int | None, list[str]] = {}
    for e in entries:
        sizes.setdefault(e.n_ex, []).append(e.model_id)
    full = FULL_TEST_SET.get(dataset)
    if len(sizes) > 1:
        groups = "; ".join(f"n={n if n is not None else '?'}: {', '.join(ids)}"
                           for n, ids in sorted(sizes.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        notes.append(f"Rows use different numbers of test points, so they are not strictly comparable ({groups}).")
    elif full is not None and entries and entries[0].n_ex is not None and entries[0].n_ex < full:
        notes.append(f"All rows use a subset of {entries[0].n_ex} of the {full} test points (partial runs).")
    return notes


# ---------------------------------------------------------------- generic table writers

def markdown_table(headers: list[str], aligns: str, rows: list[list[str]], notes: list[str] = ()) -> str:
    """GitHub markdown; ``aligns`` has one of l/c/r per column."""
    rule = {"l": "---", "c": ":---:", "r": "---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule[a] for a in aligns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "†": r"$^\dagger$", "—": "---", "−": "$-$", "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex_table(headers: list[str], aligns: str, rows: list[list[str]], notes: list[str] = (),
                caption: str | None = None) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}) followed by its notes; cells are escaped here."""
    lines = [f"% {latex_escape(caption)}" if caption else "% generated by zoo-report",
             f"\\begin{{tabular}}{{{aligns}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in headers) + " \\\\", "\\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    # notes go below the tabular, so long ones wrap at the text width instead of widening the table
    lines += [f"\\par\\smallskip{{\\footnotesize {latex_escape(n)}\\par}}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- leaderboard renderings

HEADERS = ["#", "Model ID", "Paper", "Clean accuracy", "Robust accuracy", "Architecture", "Venue"]


def _mark(board: Leaderboard, entry: Entry) -> str:
    return " †" if entry.ours and any(not e.ours for e in board.entries) else ""


def to_markdown(board: Leaderboard) -> str:
    rows = []
    for rank, e in enumerate(board.entries, start=1):
        paper = f"*[{e.paper}]({e.link})*" if e.paper and e.link else (f"*{e.paper}*" if e.paper else "-")
        rows.append([f"**{rank}**", f"**{e.model_id}**{_mark(board, e)}", paper, f"{e.clean:.2f}%",
                     f"{e.robust:.2f}%", e.architecture or "-", e.venue or "-"])
    return f"### {board.title}\n\n" + markdown_table(HEADERS, "cllcccc", rows, board.notes)


def to_latex(board: Leaderboard) -> str:
    rows = [[str(rank), e.model_id + _mark(board, e), e.paper or "-", f"{e.clean:.2f}", f"{e.robust:.2f}",
             e.architecture or "-", e.venue or "-"] for rank, e in enumerate(board.entries, start=1)]
    headers = ["#", "Model ID", "Paper", "Clean (%)", "Robust (%)", "Architecture", "Venue"]
    return latex_table(headers, "rllrrll", rows, board.notes, caption=board.title)


def to_csv(board: Leaderboard) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "model_id", "paper", "link", "clean_acc", "robust_acc", "architecture", "venue",
                     "n_ex", "source", "dataset", "threat", "eps"])
    for rank, e in enumerate(board.entries, start=1):
        writer.writerow([rank, e.model_id, e.paper or "", e.link or "", f"{e.clean:.2f}", f"{e.robust:.2f}",
                         e.architecture or "", e.venue or "", "" if e.n_ex is None else e.n_ex, e.source,
                         board.dataset, board.threat, board.eps])
    return buf.getvalue()


def to_html(board: Leaderboard) -> str:
    """A self-contained page (inline CSS/JS) with a sortable, filterable table."""
    esc = html.escape
    rows = []
    for rank, e in enumerate(board.entries, start=1):
        paper = (f'<a href="{esc(e.link)}">{esc(e.paper)}</a>' if e.paper and e.link else esc(e.paper or "-"))
        cls = ' class="score"' if e.score else ""
        rows.append(
            f'<tr data-model="{esc(e.model_id)}"{cls}><td data-value="{rank}">{rank}</td>'
            f"<td>{esc(e.model_id + _mark(board, e))}</td><td>{paper}</td>"
            f'<td data-value="{e.clean:.2f}">{e.clean:.2f}%</td><td data-value="{e.robust:.2f}">{e.robust:.2f}%</td>'
            f"<td>{esc(e.architecture or '-')}</td><td>{esc(e.venue or '-')}</td>"
            f'<td data-value="{e.n_ex if e.n_ex is not None else ""}">{e.n_ex if e.n_ex is not None else "?"}</td>'
            f"<td>{esc(e.source)}</td></tr>")
    notes = "\n".join(f"<p class=\"note\">{esc(n)}</p>" for n in board.notes)
    values = {"title": esc(board.title), "rows": "\n".join(rows), "notes": notes, "count": str(len(rows))}
    template = resources.files("zoo.evaluate.report").joinpath("templates/leaderboard.html").read_text(encoding="utf-8")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


RENDERERS = {"md": to_markdown, "latex": to_latex, "csv": to_csv, "html": to_html}
