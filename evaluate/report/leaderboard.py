"""Rank result records (and RobustBench model_info files) the RobustBench way, and render the table.

Everything here refuses to mix: one table = one dataset, one threat, one eps, one AutoAttack version.
Files that cannot be trusted (malformed, unfinished) are named in ``warnings`` and left out, never
silently blended in. The record loader is shared with the paper table.

In Python the ranking is a pandas DataFrame, ready to sort, filter or plot::

    from zoo.evaluate.report.leaderboard import build_leaderboard
    board = build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir="results", model_info_dir="model_info")
    frame = board.to_frame()     # rank, model_id, paper, link, clean_acc, robust_acc, robust_ci_low, robust_ci_high
                                 # (floats, in %; the interval only for our runs), additional_data (nullable bool),
                                 # architecture, venue, n_ex (nullable int), source, dataset, threat, eps, ours, score
    frame[frame.ours].plot.scatter(x="clean_acc", y="robust_acc")

Ranking, as RobustBench's leaderboard generator does it: every entry of the dataset/threat/eps, sorted by robust
accuracy (``external`` when a model_info file has it, else ``autoattack_acc``), best first. RobustBench leaves
ties in file-system order; we break them deterministically: higher clean accuracy first, then model id (plain
string order), then our runs before published entries, then the source text. RobustBench's files write 8/255 both
as "8/255" and as "0.031"; a published Linf budget within 1e-3 of k/255 counts as k/255 (noted under the table).

``to_markdown`` / ``to_latex`` / ``to_csv`` render that frame through :mod:`.tables` (pandas' ``to_markdown``,
Styler ``to_latex`` and ``to_csv``); ``to_html`` fills a self-contained sortable, filterable page.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import pandas as pd

from zoo.domain import DATASET_TABLE, snap_to_pixel_grid
from zoo.errors import BadInputError, ZooError
from zoo.registry import load_registry, resolve_name

from . import tables
from .model_info import (FULL_TEST_SET, ROBUSTBENCH_THREAT, format_eps, is_partial, model_info_files,
                         read_model_info, same_eps)
from ..record import RunRecord

#: How tables print a data set ("CIFAR-10"); unknown ones (custom data) print as they are spelled.
DATASET_LABEL = {d.name: d.label for d in DATASET_TABLE.values()}


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
            record, notes = RunRecord.read_checked(path)   # integrity-checked (see zoo.evaluate.integrity)
        except BadInputError as exc:
            out.warnings.append(f"{exc} -- excluded")
            continue
        out.warnings += notes
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
    for record in chosen:   # a cross-threat run never replaces (nor hides behind) the model's own-threat run
        model = canonical_model(record.model) + (f" (trained for {record.trained_threat})"
                                                 if ranked_apart(record) else "")
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
    additional_data: bool | None = None               # trained with extra data (RobustBench's column); None: unknown
    robust_interval: tuple[float, float] | None = None  # exact 95% interval in %, our runs only (counts needed)
    trained_threat: str | None = None   # set when a checkpoint trained for another norm threat is evaluated here:
    #                                     listed after the ranked rows, unranked, with a footnote (never ranked)
    unreliable: bool = False     # our run's reliability checks fired (or RobustBench's entry says so)


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
        budget = "" if self.threat == "corruptions" else f" eps={self.eps}"
        return (f"{DATASET_LABEL.get(self.dataset, self.dataset)} "
                f"{ROBUSTBENCH_THREAT.get(self.threat, self.threat)}{budget} leaderboard")

    def to_frame(self) -> pd.DataFrame:
        """The ranking as a DataFrame, one row per entry, best first (columns: ``FRAME_COLUMNS``)."""
        return _frame(self)


def _entry_from_record(record: RunRecord) -> Entry:
    model = canonical_model(record.model)
    meta = load_registry().get(model)
    return Entry(model_id=model, paper=meta.paper.title if meta else None, link=meta.paper.link if meta else None,
                 clean=record.clean.percent, robust=record.robust.percent,
                 architecture=meta.architecture.label if meta else None, venue=meta.paper.venue if meta else None,
                 n_ex=record.n_ex, source=f"score-zoo run {record.run_id}", ours=True, score=meta is not None,
                 additional_data=meta.additional_data if meta else None, robust_interval=record.robust.interval,
                 trained_threat=record.trained_threat if ranked_apart(record) else None,
                 unreliable=record.unreliable)


def ranked_apart(record: RunRecord) -> bool:
    """A cross-threat run, listed unranked (corruptions boards rank any model, as RobustBench's do)."""
    return record.kind != "corruptions" and record.cross_threat


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
    """Rank the latest finished run per model (+ published entries) by robust accuracy, best first.

    ``threat="corruptions"``: our corruptions records and RobustBench's corruptions files, ranked by
    ``corruptions_acc`` (the mean over the 15 x 5 sets), as RobustBench does; no eps."""
    if threat == "corruptions":
        version, eps = "corruptions", 0.0
    warnings: list[str] = []
    records: list[RunRecord] = []
    if results_dir is not None:
        loaded = load_records(results_dir)
        records, warnings = loaded.records, loaded.warnings
    published = []
    rounded: list[str] = []   # published entries whose decimal eps was read as k/255
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
            if threat == "linf":
                snapped = snap_to_pixel_grid(entry.eps_value)
                if not same_eps(snapped, entry.eps_value):
                    entry = replace(entry, eps_value=snapped)
                    rounded.append(entry.model_id)
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
    counted_rounded = []
    for pub in published:
        if not same_eps(pub.eps_value, eps):
            warnings.append(f"{pub.model_id}.json: eps {pub.data['eps']}, not {label} -- excluded")
            continue
        if pub.model_id in rounded:
            counted_rounded.append(f"{pub.model_id} ({pub.data['eps']})")
        extra = pub.data.get("additional_data")
        entries.append(Entry(model_id=pub.model_id, paper=(pub.data.get("name") or "").strip() or None,
                             link=pub.data.get("link") or None, clean=pub.clean, robust=pub.robust,
                             architecture=pub.data.get("architecture"), venue=pub.data.get("venue") or "Unpublished",
                             n_ex=FULL_TEST_SET.get(dataset), source="RobustBench model_info", ours=False,
                             score=pub.model_id in score_ids,
                             additional_data=extra if isinstance(extra, bool) else None,
                             unreliable=pub.data.get("unreliable") is True))
    if not entries:
        others = ", ".join(format_eps(v, threat) for v in candidates if not same_eps(v, eps)) or "none"
        versions = sorted({r.version for r in records if (r.dataset, r.threat) == (dataset, threat)
                           and same_eps(r.eps_value, eps)} - {version})
        hint = f"results exist at other eps: {others}"
        if versions:
            hint += f"; at eps {label} with AutoAttack version(s) {', '.join(versions)} (pick one with --version)"
        raise BadInputError(f"no finished AutoAttack-{version} results for {dataset}/{threat} at eps {label}",
                            hint=hint)
    entries.sort(key=rank_key)
    notes = _notes(entries, dataset)
    cross = [e for e in entries if e.trained_threat]
    if cross:
        shown = ROBUSTBENCH_THREAT.get(threat, threat)
        notes.append(f"{CROSS_THREAT_MARK.strip()} trained for another threat, evaluated under {shown}: listed "
                     "below the ranking, not ranked among models trained for it (" + ", ".join(
                         f"{e.model_id}: trained for {ROBUSTBENCH_THREAT.get(e.trained_threat, e.trained_threat)}"
                         for e in cross) + ").")
    if counted_rounded:
        notes.append(f"Budgets written as decimals in RobustBench's files are read as the nearest k/255 (within "
                     f"1e-3), as its own leaderboard lists them: {', '.join(counted_rounded)} counted as {label}.")
    return Leaderboard(dataset=dataset, threat=threat, eps=label, entries=entries, notes=notes, warnings=warnings)


def rank_key(entry: Entry) -> tuple:
    """Robust accuracy first (RobustBench's only key), then the documented tie-breaks: clean accuracy (higher
    first), model id, our runs before published entries, source."""
    return (entry.trained_threat is not None, -entry.robust, -entry.clean, entry.model_id, not entry.ours,
            entry.source)


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
    if any(e.unreliable for e in entries):
        notes.append(f"{UNRELIABLE_MARK.strip()} unreliable evaluation: a reliability check fired (randomised or "
                     "dynamic model, probability outputs, zero gradients, Square beating the gradient attacks, "
                     "class count); the robust accuracy may be overestimated.")
    return notes


# ---------------------------------------------------------------- leaderboard renderings

#: The columns of ``Leaderboard.to_frame()``; the CSV file is this frame without ``ours`` and ``score``.
FRAME_COLUMNS = ("rank", "model_id", "paper", "link", "clean_acc", "robust_acc", "robust_ci_low", "robust_ci_high",
                 "additional_data", "architecture", "venue", "n_ex", "source", "dataset", "threat", "eps", "ours",
                 "score", "unreliable")
INTERVAL_COLUMNS = ("robust_ci_low", "robust_ci_high")
CSV_COLUMNS = tuple(c for c in FRAME_COLUMNS[:-3] if c not in INTERVAL_COLUMNS)   # + INTERVAL_COLUMNS on request
UNRELIABLE_MARK = " ‡"
CROSS_THREAT_MARK = " §"   # its own sign: a cross-threat row may also be unreliable


def _frame(board: Leaderboard) -> pd.DataFrame:
    ranked = [e for e in board.entries if not e.trained_threat]
    ranks = list(range(1, len(ranked) + 1)) + [None] * (len(board.entries) - len(ranked))   # cross-threat: none
    rows = [(rank, e.model_id + (CROSS_THREAT_MARK if e.trained_threat else ""), e.paper, e.link, e.clean, e.robust,
             *(e.robust_interval if e.robust_interval else (None, None)), e.additional_data, e.architecture,
             e.venue, e.n_ex, e.source, board.dataset, board.threat, board.eps, e.ours, e.score, e.unreliable)
            for rank, e in zip(ranks, board.entries)]
    frame = pd.DataFrame.from_records(rows, columns=list(FRAME_COLUMNS))
    return frame.astype({"rank": "Int64", "clean_acc": "float64", "robust_acc": "float64", "robust_ci_low": "float64",
                         "robust_ci_high": "float64", "additional_data": "boolean", "n_ex": "Int64", "ours": "bool",
                         "score": "bool", "unreliable": "bool"})


def _marks(frame: pd.DataFrame) -> pd.Series:
    """' †' after our rows when the table mixes them with published ones."""
    mixed = bool(frame["ours"].any() and not frame["ours"].all())
    ours = frame["ours"].map(lambda ours: " †" if ours and mixed else "")
    return ours + frame["unreliable"].map(lambda bad: UNRELIABLE_MARK if bad else "")


def _text(value: object) -> str:
    return "-" if pd.isna(value) else str(value)


def _yes_no(value: object) -> str:
    """The extra-data column: RobustBench's ``additional_data``, or the registry's for our runs."""
    return "-" if pd.isna(value) else ("yes" if value else "no")


def _interval(frame: pd.DataFrame) -> pd.Series:
    """'[lo, hi]' for rows with counts (our runs), blank for RobustBench's rows (they have no counts)."""
    return pd.Series([f"[{lo:.2f}, {hi:.2f}]" if not pd.isna(lo) else ""
                      for lo, hi in zip(frame["robust_ci_low"], frame["robust_ci_high"])], index=frame.index,
                     dtype=object)


def _columns(frame: pd.DataFrame, columns: dict[str, pd.Series], aligns: str, intervals: bool,
             after: str) -> tuple[pd.DataFrame, str]:
    """The display frame, with the interval column (centred) inserted after ``after`` when asked for."""
    names = list(columns)
    if intervals:
        at = names.index(after) + 1
        names.insert(at, "Robust 95% CI")
        columns["Robust 95% CI"] = _interval(frame)
        aligns = aligns[:at] + "c" + aligns[at:]
    return pd.DataFrame({name: columns[name] for name in names}), aligns


def to_markdown(board: Leaderboard, intervals: bool = False) -> str:
    frame = board.to_frame()

    def paper(row: pd.Series) -> str:
        if pd.isna(row["paper"]):
            return "-"
        return f"*[{row['paper']}]({row['link']})*" if not pd.isna(row["link"]) else f"*{row['paper']}*"

    shown, aligns = _columns(frame, {
        "#": frame["rank"].map(lambda r: "-" if pd.isna(r) else f"**{r}**"),
        "Model ID": "**" + frame["model_id"] + "**" + _marks(frame),
        "Paper": frame.apply(paper, axis=1) if len(frame) else pd.Series(dtype=object),
        "Clean accuracy": frame["clean_acc"].map(lambda v: f"{v:.2f}%"),
        "Robust accuracy": frame["robust_acc"].map(lambda v: f"{v:.2f}%"),
        "Extra data": frame["additional_data"].map(_yes_no),
        "Architecture": frame["architecture"].map(_text),
        "Venue": frame["venue"].map(_text),
    }, "cllccccc", intervals, after="Robust accuracy")
    return tables.markdown(shown, aligns, board.notes, title=board.title)


def to_latex(board: Leaderboard, intervals: bool = False) -> str:
    frame = board.to_frame()
    shown, aligns = _columns(frame, {
        "#": frame["rank"].map(_text),
        "Model ID": frame["model_id"] + _marks(frame),
        "Paper": frame["paper"].map(_text),
        "Clean (%)": frame["clean_acc"].map(lambda v: f"{v:.2f}"),
        "Robust (%)": frame["robust_acc"].map(lambda v: f"{v:.2f}"),
        "Extra data": frame["additional_data"].map(_yes_no),
        "Architecture": frame["architecture"].map(_text),
        "Venue": frame["venue"].map(_text),
    }, "rllrrcll", intervals, after="Robust (%)")
    return tables.latex(shown, aligns, board.notes, caption=board.title)


def to_csv(board: Leaderboard, intervals: bool = False) -> str:
    columns = list(CSV_COLUMNS)
    if intervals:
        at = columns.index("robust_acc") + 1
        columns[at:at] = INTERVAL_COLUMNS
    return tables.csv(board.to_frame()[columns])


def to_html(board: Leaderboard, intervals: bool = False) -> str:
    """A self-contained page (inline CSS/JS) with a sortable, filterable table."""
    esc = html.escape
    frame = board.to_frame()
    rows = []
    for row, mark in zip(frame.itertuples(index=False), _marks(frame)):
        paper = (f'<a href="{esc(row.link)}">{esc(row.paper)}</a>' if not pd.isna(row.paper) and not pd.isna(row.link)
                 else esc(_text(row.paper)))
        cls = ' class="score"' if row.score else ""
        n_ex = None if pd.isna(row.n_ex) else int(row.n_ex)
        interval = ""
        if intervals:
            interval = (f'<td data-value="{row.robust_ci_low:.2f}">[{row.robust_ci_low:.2f}, {row.robust_ci_high:.2f}]'
                        "</td>" if not pd.isna(row.robust_ci_low) else '<td data-value=""></td>')
        rows.append(
            f'<tr data-model="{esc(row.model_id)}"{cls}><td data-value="{_text(row.rank)}">{_text(row.rank)}</td>'
            f"<td>{esc(row.model_id + mark)}</td><td>{paper}</td>"
            f'<td data-value="{row.clean_acc:.2f}">{row.clean_acc:.2f}%</td>'
            f'<td data-value="{row.robust_acc:.2f}">{row.robust_acc:.2f}%</td>{interval}'
            f"<td>{_yes_no(row.additional_data)}</td>"
            f"<td>{esc(_text(row.architecture))}</td><td>{esc(_text(row.venue))}</td>"
            f'<td data-value="{n_ex if n_ex is not None else ""}">{n_ex if n_ex is not None else "?"}</td>'
            f"<td>{esc(row.source)}</td></tr>")
    notes = "\n".join(f"<p class=\"note\">{esc(n)}</p>" for n in board.notes)
    interval_header = '<th data-type="num" data-first="desc">Robust 95% CI</th>' if intervals else ""
    values = {"title": esc(board.title), "rows": "\n".join(rows), "notes": notes, "count": str(len(rows)),
              "interval_header": interval_header}
    template = resources.files("zoo.evaluate.report").joinpath("templates/leaderboard.html").read_text(encoding="utf-8")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


RENDERERS = {"md": to_markdown, "latex": to_latex, "csv": to_csv, "html": to_html}
