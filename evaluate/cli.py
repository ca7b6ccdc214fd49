"""``zoo-eval``: run, resume, shard and merge AutoAttack evaluations from the command line.

    zoo-eval --model score-wrn-28-10 --threat linf [--n-ex 1000] [--batch-size 500] [--dry-run]
    zoo-eval --resume RUN_DIR                      # continue an interrupted run
    zoo-eval --model ... --shard 0/4               # one of four shards (e.g. a Slurm array task)
    torchrun --nproc-per-node 4 -m zoo.evaluate --model ...   # one shard per GPU, rank 0 merges
    zoo-eval merge RUN_DIR                         # join finished shards and write the record
    zoo-eval verify RECORD.json                    # re-run the model on the record's stored images
    zoo-eval --suite paper [--n-ex 1000]           # every evaluation `zoo-report paper` needs

Every user-fixable problem prints one message naming it and its fix, and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from zoo.errors import BadInputError, ZooError, run_cli

from . import checks, model_source, runner
from .options import RunOptions

log = logging.getLogger("zoo.evaluate")


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zoo-eval", description="Faithful, resumable AutoAttack evaluation (same results as pyautoattack's "
                                     "run_standard_evaluation with the same seed and batch size).",
        epilog="Other commands: `zoo-eval merge RUN_DIR` joins finished shards; `zoo-eval verify RECORD` re-checks "
               "a record with its model.")
    p.add_argument("--model", help="registry name (or RobustBench id) of the model; robustbench:ID for any model of "
                                   "RobustBench's zoo")
    p.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                   help="your own network: a callable returning an nn.Module on [0, 1] NCHW images (weights from "
                        "--checkpoint, loaded strictly, when given)")
    p.add_argument("--suite", choices=["paper"], default=None,
                   help="run (or resume) every evaluation of the SCORE paper's table, one after another")
    _add_option_flags(p)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="the model's memory format (default: channels_last on GPUs and for --precision bf16 on a "
                        "CPU, where it is the faster layout; NCHW otherwise)")
    p.add_argument("--allow-large-eps", dest="allow_large_eps", action="store_const", const=True, default=None,
                   help="accept an eps that covers the whole image space (e.g. linf eps >= 1)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bar / progress lines")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run kept in RUN_DIR")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a cost estimate, run nothing")
    slurm = p.add_argument_group("Slurm (needs `pip install score-zoo[slurm]`)")
    slurm.add_argument("--slurm", action="store_true", help="submit a job array of --shards tasks via submitit")
    slurm.add_argument("--shards", type=int, default=1, help="number of Slurm array tasks (shards)")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--slurm-time", type=int, default=240, help="minutes per task (default 240)")
    slurm.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per task (default 1)")
    slurm.add_argument("--slurm-log-dir", default="slurm-logs", help="submitit's log folder")
    # submitit's cluster (hidden; for tests): "local" runs the same job functions through submitit's real
    # LocalExecutor on this machine instead of submitting to Slurm
    slurm.add_argument("--slurm-cluster", default=None, help=argparse.SUPPRESS)
    return p


def _add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunOptions field (those whose flag is not written out above), default None = "not given",
    so that a flag next to --resume can be told apart from the run's saved value."""
    for f in dataclasses.fields(RunOptions):
        meta = f.metadata
        if meta["flag"] is None:
            continue
        default = f"default {f.default}" if f.default is not None else None
        p.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), dest=f.name, default=None, type=meta["type"],
                       choices=list(meta["choices"]()) if meta["choices"] else None, metavar=meta["metavar"],
                       help=meta["help"] + (f" ({default})" if default else ""))


def _options_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(model, RunOptions overrides) for a run, from the flags given, on top of a resumed run's saved ones."""
    given = {k: getattr(args, k) for k in RunOptions.names() if getattr(args, k, None) is not None}
    if args.model and args.model_factory:
        raise BadInputError("--model and --model-factory both name the network", hint="pass one of them")
    model = args.model or (model_source.FACTORY + args.model_factory if args.model_factory else None)
    if args.resume:
        inv = runner.invocation_of(args.resume)
        if inv["model_kind"] == "module":
            raise BadInputError(f"{args.resume} was started from Python with a custom module ({inv['model']})",
                                hint="resume it from Python: zoo.evaluate.run(model, run_dir=..., same arguments)")
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            raise BadInputError("--run-dir and --resume name different folders", hint="pass only --resume RUN_DIR")
        saved = RunOptions.from_invocation(inv).invocation()
        given = {**saved, **given, "run_dir": args.resume}
        model = model or inv["model"]
    if not model:
        raise BadInputError("no model given", hint="pass --model NAME (`zoo ls` lists them) or --resume RUN_DIR")
    if isinstance(given.get("attacks"), str):
        given["attacks"] = tuple(a.strip() for a in given["attacks"].split(",") if a.strip())
    if given.get("attacks") and given.get("version") is None:
        given["version"] = "custom"
    return model, given


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo-eval merge",
                                description="Join the finished shards of a run folder, check them, write the record.")
    p.add_argument("run_dir", help="the run folder (printed when the run started)")
    p.add_argument("--results-dir", default=None, help="override where the record is written")
    p.add_argument("--device", default=None, help="device for the fp32 re-check (default: the run's device type)")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo-eval verify",
                                description="Check a result record against its .npz, rebuild its model and data, and "
                                            "re-run the model on the stored adversarial and clean images.")
    p.add_argument("record", help="the result record .json (its <run-id>.npz beside it)")
    p.add_argument("--device", default=None, help="device for the fp32 re-check (default: the run's device type)")
    return p


def _summary(record) -> str:
    def row(name: str, acc, extra: str = "") -> str:
        lo, hi = acc.interval
        return f"  {name:<10} {acc.percent:6.2f}%  ({acc.correct}/{acc.total}, 95% CI {lo:.2f}-{hi:.2f}){extra}"

    lines = [f"{record.model}  {record.dataset} {record.threat} eps={record.eps}  {record.version}  "
             f"n={record.n_ex}  seed={record.seed}  batch={record.batch_size}", row("clean", record.clean)]
    lines += [row(s.attack, s.robust, f"  {s.seconds:.1f} s") for s in record.stages]
    lines += [f"  {c:<18} " + " ".join(f"{p:6.2f}" for p in accs) for c, accs in record.corruption_percent.items()]
    lines.append(row("corruptions" if record.kind == "corruptions" else "robust", record.robust))
    if record.cross_threat:
        lines.append(f"  (checkpoint trained for {record.trained_threat}, evaluated under {record.threat})")
    lines += checks.summary_lines(record.checks)   # the reliability block
    return "\n".join(lines)


def _submit_slurm(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        import submitit
    except ImportError:
        raise ZooError("--slurm needs submitit, which is not installed",
                       hint="pip install 'score-zoo[slurm]' (or run shards yourself with --shard I/K)") from None
    if args.shards < 1:
        raise BadInputError(f"--shards must be at least 1, got {args.shards}")
    if args.shard is not None:
        raise BadInputError("--slurm picks the shards itself", hint="drop --shard and set --shards K")
    base = _strip_slurm_flags(argv)
    executor = submitit.AutoExecutor(folder=args.slurm_log_dir,
                                     **({"cluster": args.slurm_cluster} if args.slurm_cluster else {}))
    params = {"timeout_min": args.slurm_time, "gpus_per_node": args.slurm_gpus, "tasks_per_node": 1,
              "slurm_array_parallelism": args.shards}
    if args.slurm_partition:
        params["slurm_partition"] = args.slurm_partition
    executor.update_parameters(**params)
    task = SlurmTask()
    argvs = [base + ["--shard", f"{i}/{args.shards}", "--no-progress"] for i in range(args.shards)]
    jobs = executor.map_array(task, argvs)
    print(f"submitted {len(jobs)} Slurm task(s): {', '.join(j.job_id for j in jobs)}")
    print("each task resumes from its state when requeued; the last one to finish writes the record "
          "(or run `zoo-eval merge RUN_DIR` with the run folder from the task logs)")
    return 0


def _strip_slurm_flags(argv: list[str]) -> list[str]:
    valued = {"--shards", "--slurm-partition", "--slurm-time", "--slurm-gpus", "--slurm-log-dir", "--slurm-cluster"}
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if item == "--slurm":
            continue
        if name in valued:
            skip = "=" not in item
            continue
        out.append(item)
    return out


class SlurmTask:
    """A picklable callable for submitit: runs one shard; on preemption/timeout, requeues itself."""

    def __call__(self, argv: list[str]) -> int:
        code = main(argv)
        if code:
            raise SystemExit(code)
        return code

    def checkpoint(self, argv: list[str]):
        import submitit
        return submitit.helpers.DelayedSubmission(self, argv)  # the rerun resumes from the shard state


def _run_suite(args: argparse.Namespace) -> int:
    """Each paper-table evaluation in turn; re-running the command resumes where it stopped."""
    from .report.paper_table import paper_suite

    clashing = [f"--{name.replace('_', '-')}" for name in ("model", "model_factory", "dataset", "threat", "eps",
                                                          "resume", "run_dir", "shard", "model_label")
                if getattr(args, name) is not None]
    if clashing:
        raise BadInputError(f"--suite paper picks the models, datasets and eps itself; drop {', '.join(clashing)}")
    if args.checkpoint is not None:
        raise BadInputError("--checkpoint names one file, but --suite paper runs four checkpoints",
                            hint="pre-download them with `zoo download score-wrn-28-10 score-wrn-70-16`")
    for evaluation in paper_suite():
        args.model, args.dataset, args.threat, args.eps = evaluation
        model, options = _options_from_args(args)
        print(f"== {model} {args.dataset} {args.threat} eps={args.eps}")
        if args.dry_run:
            print(runner.plan(model, **options).text)
            continue
        record = runner.run(model, **options)
        if record is not None:
            print(_summary(record))
    return 0


def _configure_logging() -> None:
    """Our progress lines at INFO; pyautoattack's own chatter only from WARNING up."""
    _log_to_stderr("zoo.evaluate", "%(message)s", logging.INFO)
    _log_to_stderr("auto-attack", "autoattack: %(message)s", logging.WARNING)


def _log_to_stderr(name: str, fmt: str, level: int) -> None:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    return run_cli("zoo-eval", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["merge"]:
        args = _merge_parser().parse_args(argv[1:])
        record = runner.merge(args.run_dir, results_dir=args.results_dir, device=args.device)
        results_dir = args.results_dir or runner.invocation_of(args.run_dir)["results_dir"]
        print(_summary(record))
        print(f"record: {Path(results_dir) / record.relative_path()}")
        return 0
    if argv[:1] == ["verify"]:
        from .reverify import verify_record

        args = _verify_parser().parse_args(argv[1:])
        print(verify_record(args.record, device=args.device).summary(args.record))
        return 0
    args = _run_parser().parse_args(argv)
    if args.slurm:
        return _submit_slurm(args, argv)
    if args.suite:
        return _run_suite(args)
    model, options = _options_from_args(args)
    if args.dry_run:
        print(runner.plan(model, **options).text)
        return 0
    record = runner.run(model, **options)
    if record is None:
        print("this shard is finished; the record is written once every shard is (see the log above)")
        return 0
    print(_summary(record))
    print(f"record: {Path(options.get('results_dir') or RunOptions.results_dir) / record.relative_path()}")
    return 0
