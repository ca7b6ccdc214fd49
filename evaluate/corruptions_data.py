"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019): the sets, the download, the layout checks.

The facts are RobustBench's (``robustbench/data.py``, 1.1.1): the 15 corruptions in its order, severities 1-5,
the Zenodo records 2535967 (CIFAR-10-C.tar) and 3555552 (CIFAR-100-C.tar), and how ``n_examples`` picks images
(per corruption and severity, the first n images of that severity's block and ``labels[:n]``).

Layout of an unpacked archive: ``<folder>/<corruption>.npy`` holding 5 x N uint8 NHWC images (severity 1 first;
N = 10,000 in the real files) and ``<folder>/labels.npy`` (5 x N labels, the test labels repeated per severity).
Pure numpy and urllib: no torch here.
"""

from __future__ import annotations

import fcntl
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo import constants
from zoo.errors import DataError, DownloadError, OfflineError
from zoo.fileio import atomic_output, file_hexdigest

log = logging.getLogger("zoo.evaluate")

#: RobustBench's CORRUPTIONS, in its order (the order of the record and of the heat map).
CORRUPTIONS: tuple[str, ...] = (
    "shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness", "fog",
    "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression", "elastic_transform")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
IMAGES_PER_SEVERITY = 10_000

CHUNK = 1 << 20   # archives come from Zenodo, or from zoo.constants.ZENODO_URL_ENV (a mirror, a test server)


@dataclass(frozen=True)
class Archive:
    dataset: str
    folder: str      # what the tar unpacks to
    filename: str
    record: str      # Zenodo record id
    md5: str         # the checksum Zenodo publishes for the file

    def url(self) -> str:
        base = constants.zenodo_url()
        return f"{base}/{self.record}/files/{self.filename}?download=1"


ARCHIVES: dict[str, Archive] = {a.dataset: a for a in (
    Archive("cifar10", "CIFAR-10-C", "CIFAR-10-C.tar", "2535967", "56bf5dcef84df0e2308c6dcbcbbd8499"),
    Archive("cifar100", "CIFAR-100-C", "CIFAR-100-C.tar", "3555552", "11f0ed0f1191edbf9fa23466ae6021d3"),
)}


def archive_for(dataset: str) -> Archive:
    if dataset not in ARCHIVES:
        raise DataError(f"no common-corruptions test set for dataset {dataset!r}",
                        hint=f"use --dataset {' or '.join(ARCHIVES)}")
    return ARCHIVES[dataset]


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class CorruptionSets:
    """A checked unpacked folder: N images per severity, every corruption file present and well shaped."""

    folder: Path
    per_severity: int
    labels: np.ndarray   # (N,) int64: the labels of one severity block

    def images(self, corruption: str, severity: int, start: int, stop: int) -> np.ndarray:
        """uint8 NHWC images start..stop-1 of one (corruption, severity) set: a writable copy."""
        return np.array(self.mapped(corruption, severity, start, stop))

    def mapped(self, corruption: str, severity: int, start: int, stop: int) -> np.ndarray:
        """The same images as a read-only view of the file (hashing reads them without a copy)."""
        data = np.load(self.folder / f"{corruption}.npy", mmap_mode="r")
        base = (severity - 1) * self.per_severity
        return data[base + start: base + stop]


def check_layout(folder: str | Path, image_shape: tuple[int, int, int] = (32, 32, 3)) -> CorruptionSets:
    """Refuse a folder that is not an unpacked CIFAR-C archive, naming the first problem (nothing is read
    beyond the .npy headers)."""
    folder = Path(folder)
    fix = "delete the folder to download it again, or pass --data-root with a complete copy"
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder", hint=fix)
    labels = _open_npy(folder / "labels.npy", fix)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0 or len(labels) % 5:
        raise DataError(f"{folder / 'labels.npy'}: shape {labels.shape} dtype {labels.dtype}; expected 5 x N integer "
                        "labels (one block per severity)", hint=fix)
    n = len(labels) // 5
    for corruption in CORRUPTIONS:
        arr = _open_npy(folder / f"{corruption}.npy", fix)
        if arr.shape != (5 * n, *image_shape) or arr.dtype != np.uint8:
            raise DataError(f"{folder / (corruption + '.npy')}: shape {arr.shape} dtype {arr.dtype}; expected "
                            f"({5 * n}, {', '.join(map(str, image_shape))}) uint8 (5 severities x {n} images)",
                            hint=fix)
    return CorruptionSets(folder=folder, per_severity=n, labels=np.asarray(labels[:n], dtype=np.int64))


def _open_npy(path: Path, fix: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing", hint=fix)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy file ({exc})", hint=fix) from None


def locate(dataset: str, data_root: str | Path | None, data_dir: str | Path | None, *,
           download: bool = True, progress: bool = False) -> CorruptionSets:
    """The checked sets: from ``data_root`` (the unpacked folder itself or the folder holding it; never
    downloaded), else ``<data_dir>/<folder>``, downloading and unpacking the archive there when missing."""
    archive = archive_for(dataset)
    if data_root is not None:
        root = Path(data_root).expanduser()
        folder = root / archive.folder if (root / archive.folder).is_dir() else root
        if not folder.is_dir():
            raise DataError(f"--data-root {root} does not exist",
                            hint=f"pass the folder holding {archive.folder}/ (or that folder itself)")
        return check_layout(folder)
    base = Path(data_dir).expanduser() if data_dir is not None else constants.cache_dir() / "data"
    folder = base / archive.folder
    if not folder.is_dir():
        if not download:
            raise DataError(f"{folder} does not exist", hint="download it first (zoo-eval --threat corruptions)")
        base.mkdir(parents=True, exist_ok=True)
        # shards and torchrun ranks start together: one downloads, the others wait for it and find the folder
        with open(base / f".{archive.folder}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                download_archive(archive, base, progress=progress)
    return check_layout(folder)


# ---------------------------------------------------------------- download


def download_archive(archive: Archive, base: Path, *, progress: bool = False) -> Path:
    """Fetch ``archive`` into ``base`` (resuming a partial ``.part`` with an HTTP Range request), check its md5,
    unpack it beside and move the checked folder into place in one rename; the archive is deleted afterwards.
    Whatever fails, ``<base>/<folder>`` either does not exist or is complete."""
    base.mkdir(parents=True, exist_ok=True)
    url = archive.url()
    if constants.hf_offline():
        raise OfflineError(f"{archive.folder} is not in {base} and offline mode is on (HF_HUB_OFFLINE)",
                           hint=f"copy the unpacked {archive.folder} folder there, or pass --data-root with it")
    part = base / f"{archive.filename}.part"
    _download_resumable(url, part, progress)
    digest = file_hexdigest(part, "md5")
    if digest != archive.md5:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{archive.filename} from {url}: md5 {digest}, expected {archive.md5} (deleted)",
                            hint="download again; if it keeps failing, fetch the archive by hand and pass "
                                 "--data-root with the unpacked folder")
    _unpack(part, archive, base)
    part.unlink(missing_ok=True)
    return base / archive.folder


def _download_resumable(url: str, part: Path, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "score-zoo"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    host = urllib.parse.urlsplit(url).netloc
    offline_hint = ("no internet here? download it elsewhere and pass --data-root with the unpacked folder "
                    f"(or set {constants.ZENODO_URL_ENV} to a mirror)")
    try:
        response = urllib.request.urlopen(request, timeout=constants.http_timeout())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:   # the part is already whole (or longer than the file): check it
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}", hint=offline_hint) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {host} to download {part.name[:-5]} ({reason})",
                            hint=offline_hint) from None
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            log.info("%s: the server ignored the range request; downloading from the start", host)
        total = response.headers.get("Content-Length")
        log.info("downloading %s (%s%s)", url, "resuming at %d bytes, " % have if resumed else "",
                 f"{int(total) / 1e6:.1f} MB" if total else "size unknown")
        with open(part, "ab" if resumed else "wb") as fh:
            try:
                while block := response.read(CHUNK):
                    fh.write(block)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"the download of {url} broke off ({exc}); {fh.tell()} bytes are kept in {part}",
                                    hint="run the same command again to resume") from None
            if total is not None and fh.tell() < have * bool(resumed) + int(total):
                raise DownloadError(f"the download of {url} ended early ({fh.tell()} bytes kept in {part})",
                                    hint="run the same command again to resume")


def _unpack(tar_path: Path, archive: Archive, base: Path) -> None:
    """Unpack into a temporary folder beside the target, check the layout, then rename it into place."""
    staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{archive.folder}.unpack-"))
    try:
        try:
            with tarfile.open(tar_path) as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{tar_path} cannot be unpacked ({exc}): truncated or not a tar archive",
                            hint="delete it and download again") from None
        unpacked = staging / archive.folder
        if not unpacked.is_dir():
            raise DataError(f"{tar_path} holds no {archive.folder}/ folder", hint="delete it and download again")
        check_layout(unpacked)
        os.replace(unpacked, base / archive.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_standin(folder: str | Path, images: dict[str, np.ndarray], labels: np.ndarray) -> Path:
    """Write a folder in the real layout (tests, stand-ins): ``images[c]`` is (5 x N, H, W, 3) uint8."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in {**images, "labels": labels}.items():
        with atomic_output(folder / f"{name}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
    return folder
