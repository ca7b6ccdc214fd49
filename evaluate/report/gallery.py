"""``zoo-report gallery``: fooled examples side by side -- clean image, adversarial image, amplified perturbation.

For the first N examples an attack fooled (in the order of the run), it draws the three pictures with the true
and the adversarial label and the attack that broke it, and writes ``gallery.png`` plus a self-contained
``gallery.html`` (every image inlined as base64) into one folder.

Adversarial images come from the record's ``<run-id>.npz``; clean images from the record's data source, read
again: a ``file`` source is the user's .npz, a ``torchvision`` source the CIFAR folder (read with torchvision's
dataset class, never downloaded; torch is imported only then). The labels of that source must agree with the
run's clean predictions, so a changed data file cannot be drawn as if it were the evaluated one.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zoo.domain import CLASS_NAMES, DATASET_TABLE
from zoo.errors import BadInputError
from zoo.fileio import sha256_file

from ..record import RunRecord
from .leaderboard import DATASET_LABEL

DEFAULT_COUNT = 8
OUTPUTS = ("gallery.png", "gallery.html")


@dataclass(frozen=True)
class Example:
    position: int          # position in the run (into record.indices)
    index: int             # index into the data set
    label: int
    adv_label: int
    attack: str
    clean: np.ndarray      # (C, H, W) float32 in [0, 1]
    adv: np.ndarray


@dataclass(frozen=True)
class Gallery:
    record: RunRecord
    examples: list[Example]
    classes: tuple[str, ...] | None
    fooled_total: int

    def name(self, label: int) -> str:
        if self.classes is not None and 0 <= label < len(self.classes):
            return self.classes[label]
        return f"class {label}"

    @property
    def title(self) -> str:
        r = self.record
        return (f"{r.model} on {DATASET_LABEL.get(r.dataset, r.dataset)}, {r.threat} eps={r.eps}: "
                f"{len(self.examples)} of {self.fooled_total} fooled examples (run {r.run_id})")


def build_gallery(record_path: str | Path, count: int = DEFAULT_COUNT) -> Gallery:
    if count < 1:
        raise BadInputError(f"-n must be at least 1, got {count}")
    record, per = RunRecord.read_with_arrays(record_path)
    if not len(per.adv_positions):
        raise BadInputError(f"run {record.run_id}: no attack fooled any example, so there is nothing to draw")
    positions = per.adv_positions[:count]
    rows = np.searchsorted(per.adv_positions, positions)
    clean, labels, classes = clean_images(record, per.indices[positions])
    mismatched = int(np.sum(labels != per.clean_pred[positions]))
    if mismatched:  # every fooled example was classified correctly before the attack
        raise BadInputError(f"the data source of run {record.run_id} ({_describe(record)}) gives other labels than "
                            f"the run saw at {mismatched} of {len(positions)} examples: not the evaluated data",
                            hint="restore the data the run evaluated")
    examples = [Example(position=int(p), index=int(per.indices[p]), label=int(labels[i]),
                        adv_label=int(per.adv_pred[p]), attack=_attack(record, int(per.broken_by[p])),
                        clean=clean[i], adv=np.asarray(per.x_adv[rows[i]], dtype=np.float32))
                for i, p in enumerate(positions)]
    for example in examples:
        if example.adv.shape != example.clean.shape:
            raise BadInputError(f"adversarial images of {record_path} have shape {example.adv.shape}, the data "
                                f"source's images {example.clean.shape}: not the evaluated data")
    return Gallery(record=record, examples=examples, classes=classes, fooled_total=len(per.adv_positions))


def _attack(record: RunRecord, broken_by: int) -> str:
    return record.attacks[broken_by] if 0 <= broken_by < len(record.attacks) else f"attack #{broken_by}"


def _describe(record: RunRecord) -> str:
    return f"{record.data.get('source')} {record.data.get('path')}"


# ---------------------------------------------------------------- clean images from the record's data source

def clean_images(record: RunRecord, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Images (N, C, H, W) float32 in [0, 1], labels and class names of ``indices`` in the record's data source."""
    source, path = record.data.get("source"), record.data.get("path")
    if source == "file":
        return _from_file(record, Path(str(path)), indices)
    if source == "torchvision":
        return _from_torchvision(record, Path(str(path)), indices)
    raise BadInputError(f"run {record.run_id}: unknown data source {source!r}; the gallery reads 'file' and "
                        "'torchvision' sources")


def _from_file(record: RunRecord, path: Path, indices: np.ndarray):
    if not path.is_file():
        raise BadInputError(f"the data file of run {record.run_id}, {path}, is missing",
                            hint="put the .npz the run evaluated back at that path")
    expected = record.data.get("sha256")
    if expected and sha256_file(path) != expected:
        raise BadInputError(f"the data file {path} has changed since run {record.run_id} (sha256 differs)",
                            hint="restore the .npz the run evaluated")
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"cannot read data file {path} ({exc})") from None
    if len(x) <= int(indices.max()) or len(y) != len(x):
        raise BadInputError(f"data file {path} holds {len(x)} images; run {record.run_id} used index {indices.max()}")
    images = x[indices]
    if images.dtype == np.uint8:           # NHWC 0-255, as zoo-eval reads it
        images = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    return images.astype(np.float32), y[indices].astype(np.int64), CLASS_NAMES.get(record.dataset)


def _from_torchvision(record: RunRecord, folder: Path, indices: np.ndarray):
    meta = DATASET_TABLE.get(record.dataset)
    if meta is None or not folder.is_dir():
        raise BadInputError(f"the CIFAR folder of run {record.run_id}, {folder}, is missing",
                            hint="point the run's data back there (e.g. unpack the test set into that folder)")
    import torchvision  # only here: every other report command stays torch-free

    try:
        dataset = getattr(torchvision.datasets, meta.torchvision_class)(str(folder.parent), train=False,
                                                                        download=False)
    except RuntimeError as exc:   # "Dataset not found or corrupted"
        raise BadInputError(f"cannot read {meta.label} from {folder} ({exc})") from None
    images = dataset.data[indices].transpose(0, 3, 1, 2).astype(np.float32) / 255
    labels = np.asarray(dataset.targets, dtype=np.int64)[indices]
    return images, labels, tuple(dataset.classes)


# ---------------------------------------------------------------- pictures

def perturbation(example: Example, record: RunRecord) -> tuple[np.ndarray, str]:
    """The perturbation mapped to [0, 1] around mid-grey, and a caption saying how much it was amplified."""
    delta = example.adv - example.clean
    scale = record.eps_value if record.threat == "linf" else float(np.abs(delta).max())
    scale = scale if scale > 0 else 1.0
    shown = np.clip(0.5 + delta / (2 * scale), 0, 1)
    return shown, f"perturbation ×{0.5 / scale:.0f} (max |δ| {np.abs(delta).max() * 255:.1f}/255)"


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.clip(image, 0, 1).transpose(1, 2, 0)
    return image[..., 0] if image.shape[-1] == 1 else image


def figure(gallery: Gallery) -> Any:
    from .plots import _matplotlib

    _matplotlib()
    from matplotlib.figure import Figure

    n = len(gallery.examples)
    fig = Figure(figsize=(6.0, 2.1 * n + 0.4), dpi=100, layout="constrained")
    fig.suptitle(gallery.title, fontsize=8)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, example in zip(axes, gallery.examples):
        delta, caption = perturbation(example, gallery.record)
        panels = [(example.clean, f"clean #{example.index}\ntrue: {gallery.name(example.label)}"),
                  (example.adv, f"adversarial ({example.attack})\nnow: {gallery.name(example.adv_label)}"),
                  (delta, caption.replace(" (", "\n("))]
        for ax, (image, text) in zip(row, panels):
            ax.imshow(_hwc(image), interpolation="nearest", cmap="gray" if image.shape[0] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_title(text, fontsize=8)
            ax.set_axis_off()
    return fig


def _png(image: np.ndarray) -> str:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    hwc = _hwc(image)
    imsave(buf, hwc, format="png", cmap="gray" if hwc.ndim == 2 else None, vmin=0, vmax=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
  body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem; color: #1d1d1f; }}
  h1 {{ font-size: 1.2rem; }}
  table {{ border-collapse: collapse; }}
  td, th {{ padding: 0.4rem 0.8rem; border-bottom: 1px solid #ddd; text-align: center; font-size: 0.9rem; }}
  img {{ width: 128px; height: 128px; image-rendering: pixelated; display: block; margin: 0 auto 0.3rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>Clean image, adversarial image, and the perturbation amplified around mid-grey.</p>
<table>
<thead><tr><th>#</th><th>Clean</th><th>Adversarial</th><th>Perturbation</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</body>
</html>
"""


def page(gallery: Gallery) -> str:
    esc = html.escape
    rows = []
    for example in gallery.examples:
        delta, caption = perturbation(example, gallery.record)
        rows.append(
            f"<tr><td>{example.index}</td>"
            f'<td><img alt="clean" src="data:image/png;base64,{_png(example.clean)}">'
            f"true: {esc(gallery.name(example.label))}</td>"
            f'<td><img alt="adversarial" src="data:image/png;base64,{_png(example.adv)}">'
            f"now: {esc(gallery.name(example.adv_label))}<br>broken by {esc(example.attack)}</td>"
            f'<td><img alt="perturbation" src="data:image/png;base64,{_png(delta)}">{esc(caption)}</td></tr>')
    return PAGE.format(title=esc(gallery.title), rows="\n".join(rows))


def render(gallery: Gallery) -> dict[str, bytes]:
    """The gallery's files, by name, all built in memory before anything is written."""
    buf = io.BytesIO()
    figure(gallery).savefig(buf, format="png")
    return dict(zip(OUTPUTS, (buf.getvalue(), page(gallery).encode("utf-8"))))
