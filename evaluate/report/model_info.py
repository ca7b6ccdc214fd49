"""RobustBench's formats: the curated ``model_info/<dataset>/<Threat>/<id>.json`` files and the
new-model submission issue.

We write model_info files byte-for-byte the way RobustBench's curated ones look (key order, strings with
two decimals, indent 2, trailing newline) so a reproduced result can be dropped into a RobustBench pull
request unchanged; and we read them back to rank our runs next to published entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from zoo.errors import BadInputError
from zoo.pins import RELEASED
from zoo.domain import DATASET_TABLE, THREAT_TABLE, parse_eps
from zoo.registry import ModelInfo, Source, info

from ..record import RunRecord

#: Size of the full test split RobustBench evaluates on; fewer points make a partial run.
FULL_TEST_SET = {d.name: d.test_size for d in DATASET_TABLE.values()}

#: RobustBench's spelling of our threat names (its folder names and ThreatModel values).
ROBUSTBENCH_THREAT = {t.name: t.robustbench for t in THREAT_TABLE.values()}

#: The keys of a curated model_info file, in RobustBench's order.
MODEL_INFO_KEYS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                   "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable")


def format_eps(value: float, threat: str) -> str:
    """RobustBench's eps spelling: '8/255' for Linf budgets on the 1/255 grid, else the plain number."""
    if threat == "linf":
        steps = Fraction(value).limit_denominator(255)
        if abs(float(steps) - value) < 1e-9 and (255 % steps.denominator == 0):
            return f"{steps.numerator * (255 // steps.denominator)}/255"
    return f"{value:g}"


def same_eps(a: float, b: float) -> bool:
    """Budgets written as '8/255' and 0.0313725... are the same budget."""
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def is_partial(record: RunRecord) -> bool:
    full = FULL_TEST_SET.get(record.dataset)
    return full is None or record.n_ex < full


def is_released(record: RunRecord) -> bool:
    """The evaluated weights are a released checkpoint (provenance in ``zoo.pins.RELEASED``: their sha256 matched
    one pinned in checkpoints.yaml). Older records, which do not say, are not."""
    return record.checkpoint.get("provenance") in RELEASED and bool(record.checkpoint.get("sha256"))


def checkpoint_statement(record: RunRecord) -> str:
    """What the evaluated weights were, for readers of a table or a submission."""
    sha = record.checkpoint.get("sha256")
    if is_released(record):
        return f"released checkpoint (sha256 {sha})"
    provenance = record.checkpoint.get("provenance")
    if provenance in ("first-use", "local-pin"):
        return f"downloaded file, not verified against a release (trusted on first use; sha256 {sha})"
    if provenance is None:
        return "checkpoint not verified against a release (the record predates provenance)"
    return "local file, not verified against a release" + (f" (sha256 {sha})" if sha else "")


def refuse_custom_data(record: RunRecord) -> None:
    """RobustBench numbers are on its CIFAR test splits; a run on a user's --data file cannot be listed."""
    if record.dataset == "custom":
        source = record.data.get("path") or record.data.get("name") or "a --data file"
        raise BadInputError(f"run {record.run_id} ({record.model}) was evaluated on custom data ({source}), "
                            "not on a RobustBench test split",
                            hint="evaluate on --dataset cifar10 / cifar100 (with --data-root DIR for a local "
                            "copy of CIFAR) instead of --data FILE.npz")


#: RobustBench's corruptions model_info keys (its ``ModelInfo`` order, as ``update_json`` writes them).
CORRUPTIONS_MODEL_INFO_KEYS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
                               "venue", "architecture", "eps", "clean_acc", "reported", "corruptions_acc",
                               "footnote")


def model_info(record: RunRecord, allow_partial: bool = False) -> dict[str, Any]:
    """The RobustBench model_info entry for one complete AutoAttack-standard (or corruptions) run of a registry
    model."""
    refuse_custom_data(record)
    if record.kind == "corruptions":
        return _corruptions_model_info(record, allow_partial)
    meta = info(record.model)
    if record.cross_threat:
        raise BadInputError(f"run {record.run_id} evaluates a checkpoint trained for {record.trained_threat} under "
                            f"{record.threat}; RobustBench's {ROBUSTBENCH_THREAT[record.threat]} files list the "
                            "released checkpoint for that threat", hint="publish it as a cross-threat result in "
                                                                          "a leaderboard (it is marked there)")
    variant = meta.variant(record.dataset, record.threat)
    origin = f"run {record.run_id} ({record.model}, {record.dataset}, {record.threat})"
    if not record.complete:
        raise BadInputError(f"{origin} is incomplete: a model_info file needs a finished run",
                            hint="finish (or resume) the run with zoo-eval first")
    if record.version != "standard":
        raise BadInputError(f"{origin} used AutoAttack version {record.version!r}; RobustBench lists 'standard'",
                            hint="evaluate with --version standard")
    if not same_eps(record.eps_value, variant.eps_value):
        raise BadInputError(f"{origin} is at eps {format_eps(record.eps_value, record.threat)}, but the "
                            f"released checkpoint is rated at {variant.eps}",
                            hint=f"evaluate at --eps {variant.eps}")
    if is_partial(record) and not allow_partial:
        raise BadInputError(f"{origin} covers only {record.n_ex} of {FULL_TEST_SET.get(record.dataset, '?')} "
                            "test points; RobustBench numbers use the full test set",
                            hint="evaluate on the full test set, or pass --allow-partial for a draft")
    return {
        **_paper_fields(meta, record),
        "eps": format_eps(record.eps_value, record.threat),
        "clean_acc": f"{record.clean.percent:.2f}",
        "reported": f"{variant.reported['autoattack_acc']:.2f}",
        "autoattack_acc": f"{record.robust.percent:.2f}",
        "footnote": meta.footnote,
        "unreliable": record.unreliable,   # the reliability checks' verdict (README: Reliability checks)
    }


def _corruptions_model_info(record: RunRecord, allow_partial: bool) -> dict[str, Any]:
    """RobustBench's corruptions file (``model_info/<dataset>/corruptions/<id>.json``): ``corruptions_acc`` = the
    mean over the 15 x 5 sets, ``eps`` null. ``corruptions_mce`` is left out: it needs RobustBench's AlexNet
    accuracies (its unaggregated_results.csv), which this harness does not have."""
    meta = info(record.model)
    origin = f"run {record.run_id} ({record.model}, {record.dataset}, corruptions)"
    if not record.complete:
        raise BadInputError(f"{origin} is incomplete", hint="finish (or resume) the run with zoo-eval first")
    if is_partial(record) and not allow_partial:
        raise BadInputError(f"{origin} covers only {record.n_ex} of {FULL_TEST_SET.get(record.dataset, '?')} images "
                            "per corruption and severity; RobustBench uses all of them",
                            hint="evaluate without --n-ex, or pass --allow-partial for a draft")
    return {
        **_paper_fields(meta, record),
        "eps": None,
        "clean_acc": f"{record.clean.percent:.2f}",
        "reported": None,
        "corruptions_acc": f"{record.robust.percent:.2f}",
        "footnote": meta.footnote,
    }


def _paper_fields(meta: ModelInfo, record: RunRecord) -> dict[str, Any]:
    """The fields every RobustBench model_info file opens with, in RobustBench's own spelling when the registry
    keeps it (``robustbench:`` block), else the paper's."""
    spelled = meta.robustbench
    return {
        "link": spelled.link if spelled else meta.paper.link,
        "name": spelled.name if spelled else meta.paper.title,
        "authors": ", ".join(meta.paper.authors),
        "additional_data": meta.additional_data,
        "number_forward_passes": 1,  # deterministic single-pass networks; no test-time randomness
        "dataset": record.dataset,
        "venue": (spelled.venue if spelled and spelled.venue else meta.paper.venue),
        "architecture": meta.architecture.label,
    }


def dumps_model_info(entry: dict[str, Any]) -> str:
    keys = CORRUPTIONS_MODEL_INFO_KEYS if "corruptions_acc" in entry else MODEL_INFO_KEYS
    return json.dumps({k: entry[k] for k in keys}, indent=2) + "\n"


def model_info_filename(record: RunRecord) -> str:
    return f"{info(record.model).robustbench_id}.json"


def source_link(source: Source) -> str:
    """A browsable address for one registry source."""
    if source.kind == "hub":
        return f"https://huggingface.co/{source.resolved_repo_id}/blob/{source.revision or 'main'}/{source.filename}"
    if source.kind == "url":
        return str(source.url)
    return f"https://drive.google.com/file/d/{source.file_id}"


def submission_text(records: list[RunRecord], allow_partial: bool = False) -> str:
    """RobustBench's 'New Model(s)' issue, filled in from finished runs of one paper's models."""
    if not records:
        raise BadInputError("a submission needs at least one result record")
    for record in records:
        refuse_custom_data(record)
    metas: list[ModelInfo] = [info(r.model) for r in records]
    if len({m.paper.title for m in metas}) != 1:
        raise BadInputError("a submission covers one paper; these records come from several: "
                            + ", ".join(sorted({m.paper.title for m in metas})))
    paper = metas[0].paper
    issue_id = metas[0].robustbench_id.split("_")[0]
    lines = [f"<!-- issue title: [New Model] {issue_id} -->", "", "# Paper Information", "",
             f"- **Paper Title**: {paper.title}", f"- **Paper URL**: {paper.link}",
             f"- **Paper authors**: {', '.join(paper.authors)}", "", "# Leaderboard Claim(s)", ""]
    for number, (record, meta) in enumerate(zip(records, metas), start=1):
        entry = model_info(record, allow_partial=allow_partial)
        variant = meta.variant(record.dataset, record.threat)
        # an unpinned Hub repo (revision null) is not published yet: do not send reviewers there
        links = ", ".join(source_link(s) for s in variant.sources if s.kind != "hub" or s.revision)
        code = f"; code: {paper.code}" if paper.code else ""
        lines += [
            f"## Model {number}", "",
            f"- **Model ID**: {meta.robustbench_id} ({record.dataset})",
            f"- **Architecture**: {entry['architecture']}",
            f"- **Threat Model**: {ROBUSTBENCH_THREAT[record.threat]}",
            f"- **eps**: {entry['eps']}",
            f"- **Clean accuracy**: {entry['clean_acc']}%",
            f"- **Robust accuracy**: {entry['autoattack_acc']}%",
            f"- **Additional data**: {str(entry['additional_data']).lower()}",
            f"- **Evaluation method**: AutoAttack {record.version} ({', '.join(record.attacks)}), "
            f"seed {record.seed}, n_ex {record.n_ex}" + (" (partial: not the full test set)"
                                                        if is_partial(record) else ""),
            f"- **Checkpoint and code**: {links}; evaluated: {checkpoint_statement(record)}" + code,
            _reliability_line(record),
            "",
        ]
    lines += ["# Model Zoo:", "",
              "- [ ] I want to add my models to the Model Zoo (check if true)",
              "- [ ] I use an architecture that is **not** included among those in RobustBench's "
              "model_zoo/architectures (check if true).",
              "- [ ] I agree to release my model(s) under MIT license (check if true) **OR**",
              "- [ ] I want my models to be released under a custom license, located here: (custom license URL here)",
              ""]
    return "\n".join(lines)


def _reliability_line(record: RunRecord) -> str:
    if record.checks is None:
        return "- **Reliability checks**: not recorded (record from before the checks)"
    if record.unreliable:
        return ("- **Reliability checks**: UNRELIABLE: " + "; ".join(
            f"{name}: {record.checks['results'][name]['reason']}" for name in record.unreliable_because))
    return "- **Reliability checks**: none fired (randomness, dynamic model, gradient masking, Square, classes)"


# ---------------------------------------------------------------- reading published entries

#: What marks a RobustBench corruptions file (2D fields; 3D common corruptions where present).
CORRUPTION_FIELDS = ("corruptions_acc", "corruptions_mce", "corruptions_acc_3d", "corruptions_mce_3d")


@dataclass(frozen=True)
class PublishedEntry:
    """One curated RobustBench model_info file, as ranked on its leaderboard."""

    model_id: str
    data: dict[str, Any]
    clean: float
    robust: float        # ``external`` when present (a stronger outside evaluation), else AutoAttack
    eps_value: float


def read_model_info(path: Path) -> PublishedEntry:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read model_info file ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: not a JSON object")
    # RobustBench's update_json writes every ModelInfo field, autoattack_acc null included, in corruptions files
    corruptions = data.get("autoattack_acc") is None and any(data.get(k) is not None for k in CORRUPTION_FIELDS)
    if corruptions and data.get("corruptions_acc") is None and data.get("corruptions_acc_3d") is not None:
        raise BadInputError(f"{path}: 3D common corruptions only (corruptions_acc_3d); RobustBench ranks it on "
                            "its 3DCC board, not this one")
    needed = ("dataset", "clean_acc", "corruptions_acc") if corruptions else \
        ("name", "dataset", "eps", "clean_acc", "autoattack_acc")
    missing = [k for k in needed if k not in data or (corruptions and data[k] is None)]
    if missing:
        raise BadInputError(f"{path}: missing field(s) {missing}")
    wrong = [k for k in ("link", "name", "authors", "dataset", "venue", "architecture") if k in data
             and not isinstance(data[k], str) and not (corruptions and data[k] is None and k != "dataset")]
    if wrong:
        raise BadInputError(f"{path}: field(s) {wrong} must be strings")
    try:
        if corruptions:   # RobustBench ranks these by corruptions_acc alone; eps is null or absent
            return PublishedEntry(model_id=path.stem, data=data, clean=float(data["clean_acc"]),
                                  robust=float(data["corruptions_acc"]), eps_value=0.0)
        robust = float(data["external"] if data.get("external") not in (None, "") else data["autoattack_acc"])
        return PublishedEntry(model_id=path.stem, data=data, clean=float(data["clean_acc"]), robust=robust,
                              eps_value=parse_eps(data["eps"]))
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{path}: malformed model_info file ({exc})") from None


def model_info_files(folder: Path, dataset: str, threat: str) -> list[Path]:
    """JSON files of a model_info folder: either RobustBench's tree root or one dataset/threat folder."""
    if not folder.is_dir():
        raise BadInputError(f"model_info folder {folder} does not exist")
    nested = folder / dataset / ROBUSTBENCH_THREAT.get(threat, threat)
    return sorted((nested if nested.is_dir() else folder).glob("*.json"))
