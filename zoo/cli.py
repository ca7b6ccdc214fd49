"""The ``zoo`` command: list, describe, prefetch and publish registry checkpoints.

    zoo ls [PATTERN] [--dataset D] [--threat T]
    zoo info NAME [--json]
    zoo download NAME... [--dataset D]... [--threat T]... [--revision REV]
    zoo publish NAME --repo-id ORG/NAME [--dataset D] [--threat T] [--checkpoint PATH] [--result RECORD.json]
                     [--revision main] [--private] [--output-dir DIR] [--license SPDX]

Every user-fixable failure (a ZooError) prints its message and fix on stderr and exits 2, like argparse errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import registry
from .errors import run_cli
from .domain import DATASETS, NORM_THREATS as THREATS
from .registry import ModelInfo


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace(command=None)

    def body() -> int:
        build_parser().parse_args(argv, namespace=args)
        return args.run(args)

    return run_cli(lambda: f"zoo {args.command}", body)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="SCORE model zoo: verified robust checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="list registered models and their reported accuracies")
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style pattern on name or RobustBench id")
    ls.add_argument("--dataset", choices=DATASETS)
    ls.add_argument("--threat", choices=THREATS)
    ls.set_defaults(run=_ls)

    info = sub.add_parser("info", help="everything the registry knows about one model")
    info.add_argument("name", help="registry name or RobustBench id")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)

    dl = sub.add_parser("download", help="prefetch checkpoints into the caches (for machines without internet)")
    dl.add_argument("names", nargs="+", metavar="NAME")
    dl.add_argument("--dataset", action="append", choices=DATASETS, help="repeatable; default: all")
    dl.add_argument("--threat", action="append", choices=THREATS, help="repeatable; default: all")
    dl.add_argument("--revision", help="Hub branch, tag or commit instead of the registry's pin")
    dl.add_argument("--print-pins", action="store_true",
                    help="print the sha256/size lines to paste into checkpoints.yaml (maintainers)")
    dl.add_argument("--forget-pins", action="store_true",
                    help="drop the local first-use pins of these checkpoints before downloading (after an "
                         "intended upstream change)")
    dl.set_defaults(run=_download)

    pub = sub.add_parser("publish", help="convert a checkpoint to safetensors + model card and upload it")
    pub.add_argument("name")
    pub.add_argument("--repo-id", help="ORG/NAME of the Hub model repo (required unless --output-dir)")
    pub.add_argument("--dataset", default="cifar10", choices=DATASETS)
    pub.add_argument("--threat", default="linf", choices=THREATS)
    pub.add_argument("--checkpoint", help="publish this local file instead of the upstream download")
    pub.add_argument("--result", help="zoo-eval result record (JSON) whose accuracies go into the model card")
    pub.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    pub.add_argument("--private", action="store_true", help="create the repo as private")
    pub.add_argument("--output-dir", help="only write the files into this folder; upload nothing")
    pub.add_argument("--license", default="other", help="license id for the model card (default: other)")
    pub.set_defaults(run=_publish)
    return parser


def _ls(args: argparse.Namespace) -> int:
    names = registry.list_models(args.pattern, args.dataset, args.threat)
    if not names:
        print(f"no registered model matches {args.pattern!r}"
              + (f" for dataset={args.dataset}" if args.dataset else "")
              + (f" threat={args.threat}" if args.threat else ""), file=sys.stderr)
        return 1
    rows = [("NAME", "ROBUSTBENCH ID", "DATASET", "THREAT", "EPS", "CLEAN %", "AUTOATTACK %")]
    for name in names:
        model = registry.info(name)
        for v in model.variants:
            if (args.dataset or v.dataset) == v.dataset and (args.threat or v.threat) == v.threat:
                rows.append((name, model.robustbench_id, v.dataset, v.threat, v.eps,
                             f"{v.reported['clean_acc']:.2f}", f"{v.reported['autoattack_acc']:.2f}"))
    print(_table(rows))
    return 0


def _info(args: argparse.Namespace) -> int:
    model = registry.info(args.name)
    if args.json:
        print(json.dumps(_info_dict(model), indent=2))
        return 0
    arch, paper = model.architecture, model.paper
    lines = [f"{model.name}  (RobustBench id: {model.robustbench_id})",
             f"  architecture: {arch.label} ({arch.name}, depth {arch.depth}, width {arch.width}, {arch.activation})",
             f"  paper: {paper.title} — {', '.join(paper.authors)}, {paper.venue}",
             f"         {paper.link}" + (f"  code: {paper.code}" if paper.code else ""),
             f"  extra training data: {'yes' if model.additional_data else 'no'}"
             + (f" ({model.footnote})" if model.footnote else "")]
    for v in model.variants:
        lines.append(f"  {v.dataset} / {v.threat}  eps={v.eps}  classes={v.num_classes}  "
                     f"reported clean {v.reported['clean_acc']:.2f}%  AutoAttack {v.reported['autoattack_acc']:.2f}%")
        for i, s in enumerate(v.sources, 1):
            pin = f"sha256 {s.sha256}" if s.sha256 else "sha256 not pinned"
            size = f", {s.size} bytes" if s.size else ""
            lines.append(f"      {i}. {s.describe()}  [{pin}{size}]")
    print("\n".join(lines))
    return 0


def _info_dict(model: ModelInfo) -> dict:
    data = dataclasses.asdict(model)
    for variant, raw in zip(model.variants, data["variants"]):
        for source, raw_source in zip(variant.sources, raw["sources"]):
            if source.kind == "hub":
                raw_source["resolved_repo_id"] = source.resolved_repo_id
    return data


def _download(args: argparse.Namespace) -> int:
    from .fetch import fetch, select_variants

    from . import pins

    plan = select_variants(args.names, args.dataset, args.threat)  # every name checked before any download
    if args.forget_pins:
        entries = [pins.key(m.name, v.dataset, v.threat, s.describe()) for m, v in plan for s in v.sources]
        print(f"forgot {pins.forget(entries)} local pin(s)", file=sys.stderr)
    for model, variant in plan:
        got = fetch(model, variant, revision=args.revision)
        print(f"{model.name} {variant.dataset}/{variant.threat}: {got.path}\n"
              f"  sha256 {got.sha256}  {got.size} bytes  from {got.source}  ({got.provenance})")
        if args.print_pins:
            print(f"  # checkpoints.yaml, {model.name} / {variant.dataset} / {variant.threat}, the source "
                  f"{got.source}:\n  sha256: {got.sha256}\n  size: {got.size}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from .publish import FILES, publish, registry_entry

    pub = publish(args.name, repo_id=args.repo_id, dataset=args.dataset, threat=args.threat,
                  checkpoint=args.checkpoint, result=args.result, revision=args.revision, private=args.private,
                  output_dir=args.output_dir, license=args.license)
    prepared = pub.prepared
    print(f"model.safetensors  sha256 {prepared.sha256}  size {prepared.size} bytes")
    print(f"converted from {prepared.upstream.source} (sha256 {prepared.upstream.sha256})")
    if pub.commit is None:
        print(f"wrote {', '.join(FILES)} to {prepared.folder} "
              "(nothing uploaded)")
        return 0
    print(f"uploaded to {pub.repo_id} revision {pub.revision}: commit {pub.commit}")
    print("pin it in checkpoints.yaml (sources of this variant):")
    print(f"  - {registry_entry(pub)}")
    return 0


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


if __name__ == "__main__":
    sys.exit(main())
