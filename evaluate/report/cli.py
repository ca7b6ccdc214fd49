"""``zoo-report``: leaderboards, the paper's table, plots and RobustBench submission files from results/.

Every output is built completely in memory and then written atomically, so a failure never leaves half a
file. Untrusted input files are named on stderr and left out; user mistakes exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.errors import BadInputError, run_cli
from zoo.fileio import atomic_write_bytes, atomic_write_text
from zoo.domain import THREATS, parse_eps

from . import leaderboard, model_info, paper_table, plots
from ..record import RunRecord

DEFAULT_RESULTS = Path("results")


def _warn(messages: list[str]) -> None:
    for message in messages:
        print(f"zoo-report: warning: {message}", file=sys.stderr)


def check_output(path: str | Path, folder: bool = False) -> Path:
    """Refuse an -o path that cannot be written, before any work: a file where a folder must be (the path's
    parent, or the path itself for folder outputs), or an existing folder where a file is to be written."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise BadInputError(f"cannot write {path}: {parent} is a file, not a folder",
                                    hint=f"choose another -o path, or move {parent} out of the way")
            break
    if folder and path.exists() and not path.is_dir():
        raise BadInputError(f"-o {path} is a file, but this command writes a folder of files there",
                            hint="give the path of a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise BadInputError(f"-o {path} is an existing folder; this command writes one file",
                            hint=f"give a file name, e.g. -o {path / 'report.md'}")
    return path


def _emit(text: str, output: str | None) -> None:
    if output:
        check_output(output)
        try:
            atomic_write_text(output, text)
        except OSError as exc:  # checked above; this is the race or the permission problem
            raise BadInputError(f"cannot write {output} ({exc.strerror or exc})",
                                hint="choose another -o path") from None
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _check_args_output(args: argparse.Namespace, folder: bool = False) -> None:
    if getattr(args, "output", None):
        check_output(args.output, folder=folder)


def _eps(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = parse_eps(text)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    if value <= 0:
        raise BadInputError(f"eps must be positive, got {text!r}")
    return value


def _results_dir(args: argparse.Namespace) -> Path | None:
    """--results, else ./results; with only --model-info and no ./results, rank the published entries alone."""
    if args.results is not None:
        return Path(args.results)
    if not DEFAULT_RESULTS.is_dir() and getattr(args, "model_info", None):
        print(f"zoo-report: note: no {DEFAULT_RESULTS}/ folder; ranking the model_info entries only", file=sys.stderr)
        return None
    return DEFAULT_RESULTS


def _board(args: argparse.Namespace) -> leaderboard.Leaderboard:
    board = leaderboard.build_leaderboard(args.dataset, args.threat, eps=_eps(args.eps),
                                          results_dir=_results_dir(args), model_info_dir=args.model_info,
                                          version=args.version)
    _warn(board.warnings)
    return board


def _read_records(paths: list[str], strict: bool) -> list[RunRecord]:
    """Records named on the command line: an error when ``strict``, else named on stderr and skipped."""
    records, problems = [], []
    for path in paths:
        try:
            record, notes = RunRecord.read_checked(path)   # integrity-checked (see zoo.evaluate.integrity)
        except BadInputError as exc:
            problems.append(f"{exc} -- excluded")
            continue
        _warn(notes)
        if not record.complete and not strict:
            problems.append(leaderboard.unfinished_warning(path, record))
            continue
        records.append(record)
    if strict and problems:
        raise BadInputError("; ".join(p.removesuffix(" -- excluded") for p in problems))
    _warn(problems)
    if not records:
        raise BadInputError("none of the given result records can be used")
    return records


# ---------------------------------------------------------------- sub-commands

def cmd_leaderboard(args: argparse.Namespace) -> int:
    _check_args_output(args)
    _emit(leaderboard.RENDERERS[args.format](_board(args), intervals=args.intervals), args.output)
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    _check_args_output(args)
    table = paper_table.build_paper_table(args.results or DEFAULT_RESULTS)
    _warn(table.warnings)
    _emit(paper_table.RENDERERS[args.format](table), args.output)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    for path in plots.output_paths(args.output):
        check_output(path)
    if args.kind == "stages":
        fig = plots.stages_figure(_read_records(args.records, strict=False))
    elif args.kind == "scatter":
        fig = plots.scatter_figure(_board(args))
    elif args.kind == "corruptions":
        fig = plots.corruptions_figure(_read_records([args.record], strict=True)[0])
    else:
        loaded = leaderboard.load_records(args.results or DEFAULT_RESULTS)
        _warn(loaded.warnings)
        fig = plots.eps_figure(plots.eps_series(loaded.records, args.dataset, args.threat, args.model,
                                                args.version), args.threat)
    for path in plots.save(fig, args.output):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    _check_args_output(args, folder=True)
    records = _read_records(args.records, strict=True)
    built = [(r, model_info.dumps_model_info(model_info.model_info(r, allow_partial=args.allow_partial)))
             for r in records]
    if not args.output:
        for _, text in built:
            sys.stdout.write(text)
        return 0
    targets = [Path(args.output) / r.dataset / model_info.ROBUSTBENCH_THREAT[r.threat]
               / model_info.model_info_filename(r) for r, _ in built]
    if len(set(targets)) != len(targets):
        raise BadInputError("several records would write the same model_info file; pass one run per model")
    for target in targets:  # all checked before the first is written
        check_output(target)
    for target, (_, text) in zip(targets, built):
        _emit(text, str(target))
    return 0


def cmd_submission(args: argparse.Namespace) -> int:
    _check_args_output(args)
    records = _read_records(args.records, strict=True)
    _emit(model_info.submission_text(records, allow_partial=args.allow_partial), args.output)
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from . import gallery

    folder = check_output(args.output or Path("gallery") / Path(args.record).stem, folder=True)
    for name in gallery.OUTPUTS:
        check_output(folder / name)
    files = gallery.render(gallery.build_gallery(args.record, args.n))
    for name, data in files.items():
        try:
            atomic_write_bytes(folder / name, data)
        except OSError as exc:
            raise BadInputError(f"cannot write {folder / name} ({exc.strerror or exc})",
                                hint="choose another -o folder") from None
        print(f"wrote {folder / name}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- argument parsing

def _selection(p: argparse.ArgumentParser, model_info_dir: bool = True) -> None:
    p.add_argument("--dataset", default="cifar10", help="cifar10 | cifar100 | custom (default cifar10)")
    p.add_argument("--threat", default="linf", choices=THREATS)
    p.add_argument("--results", help=f"folder of result records (default ./{DEFAULT_RESULTS})")
    p.add_argument("--version", default="standard", help="AutoAttack version to rank (default standard)")
    if model_info_dir:
        p.add_argument("--eps", help="budget, e.g. 8/255 (default: the only one present)")
        p.add_argument("--model-info", help="RobustBench model_info folder (tree root or one dataset/threat folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo-report", description="Leaderboards, the SCORE paper's table, plots "
                                     "and RobustBench submission files from result records.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("leaderboard", help="rank runs (and RobustBench entries) by robust accuracy")
    _selection(p)
    p.add_argument("--format", choices=sorted(leaderboard.RENDERERS), default="md")
    p.add_argument("--intervals", action="store_true", help="add the exact 95%% interval of robust accuracy "
                   "(our runs; RobustBench's entries have no counts and stay blank)")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(handler=cmd_leaderboard)

    p = sub.add_parser("paper", help="the SCORE paper's table: reported vs reproduced")
    p.add_argument("--results", help=f"folder of result records (default ./{DEFAULT_RESULTS})")
    p.add_argument("--format", choices=sorted(paper_table.RENDERERS), default="md")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(handler=cmd_paper)

    p = sub.add_parser("plot", help="figures (PNG + SVG)")
    kinds = p.add_subparsers(dest="kind", required=True)
    k = kinds.add_parser("stages", help="robust accuracy after each attack stage")
    k.add_argument("records", nargs="+", help="result record .json files")
    k = kinds.add_parser("scatter", help="clean vs robust accuracy of a leaderboard")
    _selection(k)
    k = kinds.add_parser("corruptions", help="accuracy per corruption x severity of a --threat corruptions run")
    k.add_argument("record", help="result record .json")
    k = kinds.add_parser("eps", help="robust accuracy vs eps")
    _selection(k, model_info_dir=False)
    k.add_argument("--model", action="append", help="only this model (repeatable)")
    for k in kinds.choices.values():
        k.add_argument("-o", "--output", required=True, help="output path; .png and .svg are both written")
    p.set_defaults(handler=cmd_plot)

    p = sub.add_parser("model-info", help="RobustBench model_info JSON from finished runs")
    p.add_argument("records", nargs="+", help="result record .json files")
    p.add_argument("-o", "--output", help="model_info root: writes <root>/<dataset>/<Threat>/<robustbench_id>.json")
    p.add_argument("--allow-partial", action="store_true", help="accept runs on fewer than all test points")
    p.set_defaults(handler=cmd_model_info)

    p = sub.add_parser("submission", help="RobustBench new-model issue text from finished runs")
    p.add_argument("records", nargs="+", help="result record .json files")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--allow-partial", action="store_true", help="accept runs on fewer than all test points")
    p.set_defaults(handler=cmd_submission)

    p = sub.add_parser("gallery", help="fooled examples: clean, adversarial and amplified perturbation (PNG + HTML)")
    p.add_argument("record", help="result record .json (its <run-id>.npz must lie beside it)")
    p.add_argument("-n", type=int, default=8, help="how many fooled examples (default 8, the first in run order)")
    p.add_argument("-o", "--output", help="folder for gallery.png and gallery.html (default gallery/<run-id>)")
    p.set_defaults(handler=cmd_gallery)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return args.handler(args)

    return run_cli("zoo-report", body)


if __name__ == "__main__":
    sys.exit(main())
