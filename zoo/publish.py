"""``zoo publish``: an upstream checkpoint -> validated safetensors + config + model card -> the Hub.

The weights are read with ``read_state_dict`` and loaded *strictly* into the registry's architecture before
anything is written, so only a complete, correctly shaped state dict can be published; what is saved is that
network's ``state_dict()``, i.e. exactly what ``zoo.load`` returns. The upstream file comes from the
variant's non-Hub sources (the authors' URL, Google Drive) or ``--checkpoint``: publishing from our own Hub
copy would be circular.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import constants, registry
from .checkpoint import load_into, read_state_dict
from .domain import DATASET_TABLE, NORMS
from .errors import BadInputError, OfflineError, ZooError
from .fetch import HUB_TRANSPORT_ERRORS, Fetched, fetch, fetch_local
from .fileio import atomic_write_bytes, atomic_write_text
from .models import build_model
from .registry import ModelInfo, Variant

WEIGHTS_FILE = "model.safetensors"
FILES = (WEIGHTS_FILE, "config.json", "README.md")
#: RobustBench's CIFAR leaderboards (the registry's reported numbers) evaluate the full 10,000-image test set.
REPORTED_N_EXAMPLES = DATASET_TABLE["cifar10"].test_size   # RobustBench reports on the full CIFAR test sets
DEFAULT_LICENSE = "other"  # the upstream release states no licence in the registry: don't invent one



@dataclass(frozen=True)
class Prepared:
    """The folder ready for upload and the numbers to pin in checkpoints.yaml."""

    folder: Path | None  # None once uploaded from a temporary folder
    sha256: str  # of model.safetensors
    size: int
    upstream: Fetched


@dataclass(frozen=True)
class Publication:
    prepared: Prepared
    repo_id: str
    revision: str
    commit: str | None  # None when only the folder was written (--output-dir)


def prepare(model: ModelInfo, variant: Variant, out_dir: str | Path, checkpoint: str | Path | None = None,
            result: str | Path | None = None, repo_id: str | None = None,
            license: str = DEFAULT_LICENSE) -> Prepared:
    """Write model.safetensors, config.json and README.md into ``out_dir``; validate everything first."""
    from safetensors.torch import save as save_safetensors

    record = _read_record(result) if result is not None else None  # bad input fails before any download
    upstream = fetch_local(checkpoint) if checkpoint is not None else _fetch_upstream(model, variant)
    net = build_model(model, variant)
    load_into(net, read_state_dict(upstream.path), origin=str(upstream.path))
    tensors = {key: value.detach().contiguous() for key, value in net.state_dict().items()}
    # One metadata key only: safetensors writes a multi-key metadata map in random order, and the file's
    # sha256 must be reproducible (the same upstream file always publishes the same bytes).
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    sha = hashlib.sha256(weights).hexdigest()
    if record is not None:
        _check_record(record, Path(result), model, variant, {upstream.sha256, sha})
    repo_id = repo_id or _default_repo_id(variant) or f"{constants.hub_org()}/{model.name}"

    out = Path(out_dir)
    atomic_write_bytes(out / WEIGHTS_FILE, weights)
    atomic_write_text(out / "config.json", json.dumps(model_config(model, variant, upstream), indent=2) + "\n")
    atomic_write_text(out / "README.md", model_card(model, variant, repo_id, upstream, record, license))
    return Prepared(folder=out, sha256=sha, size=len(weights), upstream=upstream)


def upload(folder: str | Path, repo_id: str, revision: str = "main", private: bool = False,
           token: str | None = None) -> str:
    """Create the repo (and branch) if needed and commit the three files; returns the commit sha."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError

    _refuse_offline()
    folder = Path(folder)
    api = HfApi(endpoint=constants.hf_endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in FILES]
        info = api.create_commit(repo_id, operations=operations, revision=revision,
                                 commit_message=f"Publish {WEIGHTS_FILE} with zoo publish")
    except HfHubHTTPError as exc:
        raise ZooError(f"uploading to {repo_id}@{revision} failed: {str(exc).strip().splitlines()[0]}",
                       hint="log in with `hf auth login` or set HF_TOKEN to a token with write access to the "
                            "organisation; check --repo-id and HF_ENDPOINT") from None
    except HUB_TRANSPORT_ERRORS as exc:
        raise ZooError(f"cannot reach the Hub to upload {repo_id}: {exc}",
                       hint="check the network / HF_ENDPOINT, or pass --output-dir to only write the files") from None
    return info.oid


def publish(name: str, repo_id: str | None = None, dataset: str = "cifar10", threat: str = "linf",
            checkpoint: str | Path | None = None, result: str | Path | None = None, revision: str = "main",
            private: bool = False, output_dir: str | Path | None = None,
            license: str = DEFAULT_LICENSE) -> Publication:
    """Prepare the folder and upload it, or only write it when ``output_dir`` is given."""
    model = registry.info(name)
    variant = model.variant(dataset, threat)
    if repo_id:
        _check_repo_id(repo_id)
    if output_dir is not None:
        prepared = prepare(model, variant, output_dir, checkpoint, result, repo_id, license)
        return Publication(prepared, repo_id or "", revision, commit=None)
    if not repo_id:
        raise BadInputError("publishing needs --repo-id ORG/NAME (or --output-dir DIR to only write the files)")
    _refuse_offline()  # before the conversion work, not after
    with tempfile.TemporaryDirectory(prefix="zoo-publish-") as tmp:
        prepared = prepare(model, variant, tmp, checkpoint, result, repo_id, license)
        commit = upload(tmp, repo_id, revision, private)
    return Publication(dataclasses.replace(prepared, folder=None), repo_id, revision, commit)


def registry_entry(publication: Publication) -> str:
    """The checkpoints.yaml source line pinning what was just published."""
    org, _, rest = publication.repo_id.partition("/")
    repo = f"{{org}}/{rest}" if org == constants.hub_org() else publication.repo_id
    return (f'{{kind: hub, repo_id: "{repo}", filename: {WEIGHTS_FILE}, revision: {publication.commit}, '
            f"sha256: {publication.prepared.sha256}, size: {publication.prepared.size}}}")


# --------------------------------------------------------------------------------------------- contents


def model_config(model: ModelInfo, variant: Variant, upstream: Fetched) -> dict:
    arch = model.architecture
    return {
        "library": "score-zoo",
        "registry_name": model.name,
        "robustbench_id": model.robustbench_id,
        "architecture": {"name": arch.name, "label": arch.label, "depth": arch.depth, "width": arch.width,
                         "activation": arch.activation},
        "num_classes": variant.num_classes,
        "mean": list(variant.mean),
        "std": list(variant.std),
        "input": "RGB images in [0, 1], NCHW; mean/std are applied inside the network",
        "dataset": variant.dataset,
        "threat": variant.threat,
        "eps": variant.eps,
        "eps_value": variant.eps_value,
        "converted_from": {"source": upstream.source, "sha256": upstream.sha256, "size": upstream.size},
    }


def model_card(model: ModelInfo, variant: Variant, repo_id: str, upstream: Fetched, record=None,
               license: str = DEFAULT_LICENSE) -> str:
    """README.md: YAML front matter with ``model-index`` results, then a human-readable card."""
    paper = model.paper
    norm = NORMS[variant.threat]
    results = [_result(variant.dataset, variant.reported["clean_acc"], variant.reported["autoattack_acc"],
                       {"attack": "AutoAttack (standard)", "norm": norm, "eps": variant.eps,
                        "n_examples": REPORTED_N_EXAMPLES},
                       {"name": f"Reported by the authors ({paper.venue}) / RobustBench", "url": paper.link})]
    if record is not None:
        results.append(_result(variant.dataset, record.clean.percent, record.robust.percent,
                               {"attack": f"AutoAttack ({record.version})", "norm": record.norm, "eps": record.eps,
                                "n_examples": record.n_ex, "seed": record.seed},
                               {"name": f"score-zoo zoo-eval run {record.run_id}"}))
    front = {
        "license": license,
        **({"license_name": "upstream-release", "license_link": paper.code or paper.link}
           if license == "other" else {}),
        "library_name": "pytorch",
        "tags": ["image-classification", "adversarial-robustness", "autoattack", "robustbench", "safetensors",
                 "score-zoo"],
        "datasets": [variant.dataset],
        "metrics": ["accuracy"],
        "model-index": [{"name": f"{model.name}-{variant.dataset}-{variant.threat}", "results": results}],
    }
    rows = [f"| {entry['source']['name']} | {entry['metrics'][0]['value']:.2f} | {entry['metrics'][1]['value']:.2f} "
            f"| {entry['metrics'][1]['args']['n_examples']} |" for entry in results]
    arch = model.architecture
    body = f"""
# {model.name} ({DATASET_TABLE[variant.dataset].label}, {norm}, eps = {variant.eps})

{arch.label} ({arch.activation}) from *{paper.title}* ({', '.join(paper.authors)}, {paper.venue}) — {paper.link}.
RobustBench id: `{model.robustbench_id}`.{f' Upstream code: {paper.code}.' if paper.code else ''}

| Results | Clean accuracy (%) | AutoAttack accuracy (%) | Test images |
|---|---|---|---|
{chr(10).join(rows)}

## Usage

```python
import zoo  # pip install score-zoo
model = zoo.load("{model.name}", dataset="{variant.dataset}", threat="{variant.threat}")
# eval mode; inputs are [0, 1] RGB images, NCHW
```

Without score-zoo: `safetensors.torch.load_file(huggingface_hub.hf_hub_download("{repo_id}", "{WEIGHTS_FILE}"))`
gives the state dict of a DeepMind-style WideResNet (RobustBench `DMWideResNet` keys); `config.json` holds the
architecture and the input normalisation (mean/std), which the network applies itself.

## Provenance

Converted with `zoo publish` from {upstream.source} (sha256 `{upstream.sha256}`, {upstream.size} bytes):
read with `torch.load(weights_only=True)`, loaded strictly into the architecture above, saved as safetensors.
"""
    if model.footnote:
        body += f"\nTraining note: {model.footnote}\n"
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


def _result(dataset: str, clean: float, robust: float, args: dict, source: dict) -> dict:
    return {
        "task": {"type": "image-classification", "name": "Image Classification"},
        "dataset": {"type": dataset, "name": DATASET_TABLE[dataset].label, "split": "test"},
        "metrics": [
            {"type": "accuracy", "name": "Clean accuracy", "value": float(clean), "verified": False},
            {"type": "accuracy", "name": f"AutoAttack robust accuracy ({args['norm']}, eps={args['eps']})",
             "value": float(robust), "args": args, "verified": False},
        ],
        "source": source,
    }


# -------------------------------------------------------------------------------------------- checks


def _fetch_upstream(model: ModelInfo, variant: Variant) -> Fetched:
    sources = tuple(s for s in variant.sources if s.kind != "hub")
    if not sources:
        raise BadInputError(f"{model.name} ({variant.dataset}, {variant.threat}) lists no upstream (non-Hub) "
                            "source to publish from", hint="pass --checkpoint PATH")
    return fetch(model, dataclasses.replace(variant, sources=sources))


def _read_record(path: str | Path):
    from .evaluate.record import RunRecord
    return RunRecord.read(path)


def _check_record(record, path: Path, model: ModelInfo, variant: Variant, weight_hashes: set[str]) -> None:
    """A model card may only quote a run of these very weights, at this dataset / threat / eps."""
    problems = []
    if record.model not in (model.name, model.robustbench_id):
        problems.append(f"it evaluated model {record.model!r}, not {model.name!r}")
    if (record.dataset, record.threat) != (variant.dataset, variant.threat):
        problems.append(f"it is for {record.dataset}/{record.threat}, not {variant.dataset}/{variant.threat}")
    if abs(record.eps_value - variant.eps_value) > 1e-9:
        problems.append(f"its eps is {record.eps}, the registry's is {variant.eps}")
    if not record.complete:
        problems.append("the run is incomplete")
    evaluated = record.checkpoint.get("sha256") if isinstance(record.checkpoint, dict) else None
    if evaluated and evaluated not in weight_hashes:
        problems.append(f"it evaluated a checkpoint with sha256 {evaluated}, not the weights being published")
    if problems:
        raise BadInputError(f"{path}: the result record does not match what is published: " + "; ".join(problems),
                            hint="pass the record of a complete zoo-eval run of this model, dataset and threat")


def _refuse_offline() -> None:
    if constants.hf_offline():
        raise OfflineError("cannot publish while offline mode is on (HF_HUB_OFFLINE=1)",
                           hint="unset HF_HUB_OFFLINE, or pass --output-dir to only write the files")


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise BadInputError(f"--repo-id {repo_id!r} is not of the form ORG/NAME")


def _default_repo_id(variant: Variant) -> str | None:
    return next((s.resolved_repo_id for s in variant.sources if s.kind == "hub"), None)
