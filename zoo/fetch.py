"""Getting checkpoint files: Hub first, then the fallbacks, verified and cached.

``fetch`` tries a variant's sources in registry order. The Hub goes through ``hf_hub_download`` (its own
cache, pinned revisions, HF_HUB_OFFLINE); the authors' URL and Google Drive are downloaded here with the
standard library into ``constants.cache_dir()``. Every file is checked before anything unpickles it:
transfer length, ``sniff_format`` (HTML pages, truncated zips), and the registry's size/sha256 when pinned.
Our cache only ever receives verified files (temp file + rename); a bad Hub blob is deleted, so the next
call downloads it afresh instead of failing forever.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from . import constants, pins, registry
from .checkpoint import sniff_format
from .errors import BadInputError, CorruptCheckpointError, DownloadError, OfflineError, UnknownVariantError, ZooError
from .fileio import atomic_output, sha256_file
from .registry import ModelInfo, Source, Variant

log = logging.getLogger(__name__)

#: Downloads larger than this get a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 10 * 2**20
_CHUNK = 1 << 20
_MAX_PAGE_BYTES = 2 * 2**20  # a Drive interstitial page is a few kB; never slurp a real file as "HTML"
_USER_AGENT = "score-zoo (python urllib)"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

try:  # huggingface_hub >= 1.0 talks httpx2; its transport errors are not OSErrors
    import httpx2 as _httpx2
    HUB_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, _httpx2.HTTPError)
except ImportError:  # older releases use requests, whose errors are OSErrors
    HUB_TRANSPORT_ERRORS = (OSError,)


@dataclass(frozen=True)
class Fetched:
    """A checkpoint file on local disk and where it came from (recorded in evaluation results)."""

    path: Path
    source: str
    sha256: str
    size: int
    provenance: str = "local-unverified"   # how far it is trusted: see zoo.pins


def fetch_local(path: str | Path, variant: Variant | None = None) -> Fetched:
    """A user-supplied checkpoint file: hashed for the record, never copied. Against a registry ``variant`` it
    counts as the release when its sha256 matches a pinned one, else it is a local file (with a warning when
    the variant does pin a release: the numbers are then not the released checkpoint's)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInputError(f"checkpoint file {path} does not exist",
                            hint="pass the path of a downloaded .pt/.pth/.safetensors file")
    sha = sha256_file(path)
    released = {s.sha256 for s in variant.sources if s.sha256} if variant is not None else set()
    provenance = pins.local_provenance(sha, released)
    if released and provenance == "local-unverified":
        log.warning("%s (sha256 %s) is not the released checkpoint (checkpoints.yaml pins %s); it is evaluated as "
                    "a local file, not as a reproduction", path, sha, ", ".join(sorted(released)))
    return Fetched(path=path.resolve(), source="local file", sha256=sha, size=path.stat().st_size,
                   provenance=provenance)


def fetch(model: ModelInfo, variant: Variant, revision: str | None = None, progress: bool = True) -> Fetched:
    """The verified checkpoint of ``model``/``variant`` from the first source that delivers one.

    ``revision`` (branch, tag or commit) overrides the registry's pin for the Hub source only. Raises
    CorruptCheckpointError if some source delivered a bad file (deleted), OfflineError if HF_HUB_OFFLINE is
    on and nothing is cached, DownloadError otherwise; each lists every source and why it failed.
    """
    offline = constants.hf_offline()
    failures: list[tuple[Source, ZooError]] = []
    for i, source in enumerate(variant.sources):
        try:
            got = _fetch_hub(source, revision, progress, offline) if source.kind == "hub" else \
                _fetch_http(source, progress, offline)
            if source.sha256:   # _verify has matched it
                return dataclasses.replace(got, provenance="pinned")
            asked = source.describe() + (f" (revision {revision})" if revision and source.kind == "hub" else "")
            entry = pins.key(model.name, variant.dataset, variant.threat, asked)
            return dataclasses.replace(got, provenance=pins.trust_on_first_use(entry, got.sha256, got.size))
        except pins.PinMismatchError:
            raise   # not a bad download to route around: the user must decide (see its hint)
        except (DownloadError, CorruptCheckpointError) as exc:
            failures.append((source, exc))
            if i + 1 < len(variant.sources):
                log.warning("%s: %s; trying the next source", source.describe(), _message(exc))
    raise _all_failed(model, variant, failures, offline)


def select_variants(names: Iterable[str], datasets: Iterable[str] | str | None = None,
                    threats: Iterable[str] | str | None = None) -> list[tuple[ModelInfo, Variant]]:
    """Every (model, variant) pair of ``names`` matching the filters; raises before anything is downloaded."""
    datasets, threats = _as_set(datasets), _as_set(threats)
    plan = []
    for name in names:
        model = registry.info(name)
        chosen = [v for v in model.variants
                  if (not datasets or v.dataset in datasets) and (not threats or v.threat in threats)]
        if not chosen:
            have = ", ".join(f"dataset={v.dataset!r} threat={v.threat!r}" for v in model.variants)  # as registry
            wanted = " ".join(f"{key}={'/'.join(sorted(values))}"
                              for key, values in (("dataset", datasets), ("threat", threats)) if values)
            raise UnknownVariantError(f"{model.name} has no checkpoint for {wanted}", hint=f"available: {have}")
        plan.extend((model, v) for v in chosen)
    return plan


def download(names: Iterable[str] | str, datasets: Iterable[str] | str | None = None,
             threats: Iterable[str] | str | None = None, revision: str | None = None,
             progress: bool = True) -> list[Fetched]:
    """Prefetch every matching variant into the caches, e.g. before moving to a cluster without internet."""
    names = [names] if isinstance(names, str) else list(names)
    return [fetch(model, variant, revision, progress) for model, variant in select_variants(names, datasets, threats)]


# --------------------------------------------------------------------------------------------- the Hub


def _fetch_hub(source: Source, revision: str | None, progress: bool, offline: bool) -> Fetched:
    from huggingface_hub import try_to_load_from_cache

    repo_id, rev = source.resolved_repo_id, revision or source.revision or "main"
    location = dict(repo_id=repo_id, filename=source.filename, revision=rev, cache_dir=constants.hf_hub_cache())
    was_cached = isinstance(try_to_load_from_cache(**location), str)
    if not (was_cached or offline):
        _check_reachable(constants.hf_endpoint() or _library_endpoint())
    path = _hub_download(location, progress, offline)
    try:
        return _verified_hub_file(path, source, repo_id)
    except CorruptCheckpointError as exc:
        if offline or not was_cached:
            raise
        log.warning("%s: %s; downloading it again", source.describe(), _message(exc))
    return _verified_hub_file(_hub_download(location, progress, offline), source, repo_id)


def _hub_download(location: dict, progress: bool, offline: bool) -> Path:
    """``hf_hub_download`` with its exceptions turned into one-line DownloadErrors / OfflineErrors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, rev = location["repo_id"], location["revision"]
    where = f"{repo_id}/{location['filename']}@{rev}"
    extra = {} if progress else {"tqdm_class": functools.partial(tqdm, disable=True)}
    try:
        return Path(hf_hub_download(**location, endpoint=constants.hf_endpoint(), local_files_only=offline, **extra))
    except LocalEntryNotFoundError as exc:  # before EntryNotFoundError: it is a subclass
        if offline:
            raise OfflineError(f"{where} is not in the Hugging Face cache "
                               f"({location['cache_dir'] or 'under the default HF_HOME'})") from None
        cause = _message(exc.__cause__) if exc.__cause__ is not None else _message(exc)
        raise DownloadError(f"the Hub is unreachable and the file is not cached ({cause})") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"repository {repo_id} does not exist "
                            "(or is private/gated and no token with access was given)") from None
    except RevisionNotFoundError:
        raise DownloadError(f"revision {rev!r} does not exist in {repo_id}") from None
    except EntryNotFoundError:
        raise DownloadError(f"{repo_id} has no file {location['filename']!r} at revision {rev!r}") from None
    except HfHubHTTPError as exc:
        raise DownloadError(f"the Hub answered {_message(exc)}") from None
    except HUB_TRANSPORT_ERRORS as exc:  # consistency check (truncated transfer), network, disk
        raise DownloadError(f"downloading {where} failed: {_message(exc)}") from None


def _library_endpoint() -> str:
    from huggingface_hub import constants as hf_constants
    return hf_constants.ENDPOINT


_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def _check_reachable(endpoint: str) -> None:
    """Fail fast when the Hub host cannot be reached at all.

    On a compute node without internet huggingface_hub retries a refused or silent connection with backoff
    for 25 s to minutes before giving up; one short TCP connect tells the same in a moment. Behind a proxy
    only the library knows the route, so the probe is skipped.
    """
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=min(constants.http_timeout(), 5.0)).close()
    except OSError as exc:
        raise DownloadError(f"the Hub at {endpoint} is unreachable ({exc}) and the file is not cached") from None


def _verified_hub_file(pointer: Path, source: Source, repo_id: str) -> Fetched:
    """Check a file in the Hub cache; a bad one is removed (snapshot link and blob) so it is fetched again."""
    blob = pointer.resolve()
    parts = pointer.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else "?"
    # LFS blobs are named after their sha256: a free integrity check even when the registry pins nothing.
    lfs_sha = blob.name if _SHA256_HEX.fullmatch(blob.name) else None

    def discard() -> None:
        pointer.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)

    sha, size = _verify(pointer, source, f"the file of commit {commit} ({pointer})", discard, lfs_sha=lfs_sha)
    return Fetched(path=pointer, source=f"Hugging Face Hub {repo_id}/{source.filename}@{commit}", sha256=sha,
                   size=size)


# ------------------------------------------------------------------------------ authors' URL, Google Drive


def _fetch_http(source: Source, progress: bool, offline: bool) -> Fetched:
    label = source.describe()
    dest = _cache_path(source)
    if dest.is_file():
        try:
            sha, size = _verify(dest, source, f"the cached copy {dest}", lambda: dest.unlink(missing_ok=True))
            return Fetched(path=dest, source=label, sha256=sha, size=size)
        except CorruptCheckpointError as exc:
            if offline:
                raise
            log.warning("%s: %s; downloading it again", label, _message(exc))
    if offline:
        raise OfflineError(f"not in the score-zoo cache ({dest})")
    response = _open_gdrive(source) if source.kind == "gdrive" else _open(source.url)
    with response:
        sha, size = _save_verified(response, dest, source, progress)
    return Fetched(path=dest, source=label, sha256=sha, size=size)


def _cache_path(source: Source) -> Path:
    """A stable cache location per source, so offline runs find what online runs stored."""
    root = constants.cache_dir()
    if source.kind == "gdrive":
        return root / "gdrive" / _safe_name(source.file_id) / "checkpoint"
    key = hashlib.sha256(source.url.encode("utf-8")).hexdigest()[:16]
    basename = urllib.parse.unquote(urllib.parse.urlsplit(source.url).path.rsplit("/", 1)[-1])
    return root / "url" / key / _safe_name(basename)


def _safe_name(text: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text or "").strip(".")
    return name or "checkpoint"


def _open(url: str) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=constants.http_timeout())
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot connect to {urllib.parse.urlsplit(url).netloc} ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a server closing without answer
        raise DownloadError(f"no answer from {urllib.parse.urlsplit(url).netloc} "
                            f"({type(exc).__name__}: {exc})") from None


def _save_verified(response, dest: Path, source: Source, progress: bool) -> tuple[str, int]:
    """Stream into a temp file next to ``dest``, verify it, then rename: the cache never holds a bad file."""
    expected = _content_length(response)
    with atomic_output(dest, suffix=".part") as tmp:
        show = bool(progress and expected and expected > PROGRESS_MIN_BYTES and _stderr_is_terminal())
        with open(tmp, "wb") as fh, tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=source.describe()[-60:], disable=not show) as bar:
            try:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead as exc:  # server closed early: keep what came, the length check says so
                fh.write(exc.partial)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(f"the transfer broke off ({type(exc).__name__}: {exc})") from None
            fh.flush()
            os.fsync(fh.fileno())
        return _verify(tmp, source, "the downloaded file", lambda: None, transfer_size=expected)


def _content_length(response) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, TypeError, ValueError):
        return None


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


# ------------------------------------------------------------------------------------------ Google Drive


def _open_gdrive(source: Source) -> http.client.HTTPResponse:
    """The file's response, going through Drive's "can't scan for viruses" confirmation when it shows one."""
    base = constants.gdrive_url()
    query = {"id": source.file_id, "export": "download"}
    url = f"{base}?{urllib.parse.urlencode(query)}"
    response = _open(url)
    if not _is_html(response):
        return response
    page = _read_page(response)
    form_url = _confirm_form_url(page, url)
    if form_url is None:
        _raise_if_refused(page, source)
        form_url = f"{base}?{urllib.parse.urlencode({**query, 'confirm': 't'})}"
    response = _open(form_url)
    if not _is_html(response):
        return response
    page = _read_page(response)
    _raise_if_refused(page, source)
    raise DownloadError("Google Drive answered with an HTML page instead of the file, "
                        "even after the virus-scan confirmation")


def _is_html(response) -> bool:
    return response.headers.get_content_type() in ("text/html", "application/xhtml+xml")


def _read_page(response) -> str:
    with response:
        data = response.read(_MAX_PAGE_BYTES)
    return data.decode(response.headers.get_content_charset() or "utf-8", errors="replace")


class _FormParser(HTMLParser):
    """Collects each <form>'s action and named <input> values."""

    def __init__(self):
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self._current: tuple[str, dict[str, str]] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self._current = (attrs.get("action", ""), {})
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None and attrs.get("name"):
            self._current[1][attrs["name"]] = attrs.get("value", "")

    def handle_endtag(self, tag):
        if tag == "form":
            self._current = None


def _confirm_form_url(page: str, page_url: str) -> str | None:
    """The URL Drive's confirmation form submits to (hidden id/export/confirm/uuid inputs), or None."""
    parser = _FormParser()
    parser.feed(page)
    parser.close()
    for action, fields in parser.forms:
        if "confirm" not in fields and "id" not in fields:
            continue
        target = urllib.parse.urljoin(page_url, action or page_url.split("?", 1)[0])
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            continue
        fields.setdefault("confirm", "t")
        return f"{target}{'&' if '?' in target else '?'}{urllib.parse.urlencode(fields)}"
    return None


_QUOTA_MARKERS = ("quota exceeded", "too many users have viewed or downloaded", "download quota")
_LOGIN_MARKERS = ("accounts.google.com/servicelogin", "accounts.google.com/v3/signin", "sign in",
                  "you need access", "request access")


def _raise_if_refused(page: str, source: Source) -> None:
    text = page.lower()
    browser = f"https://drive.google.com/file/d/{source.file_id}/view"
    if any(marker in text for marker in _QUOTA_MARKERS):
        raise DownloadError("Google Drive refuses the download: the file's download quota is exceeded "
                            "(too many downloads in the last 24 h)",
                            hint=f"retry later, or download {browser} in a browser and pass checkpoint=PATH")
    if any(marker in text for marker in _LOGIN_MARKERS):
        raise DownloadError("Google Drive asks for a sign-in: the file is not shared publicly (any more)",
                            hint=f"download {browser} in a browser with access and pass checkpoint=PATH")


# ------------------------------------------------------------------------------------------ verification


def _verify(path: Path, source: Source, what: str, discard: Callable[[], None], *,
            transfer_size: int | None = None, lfs_sha: str | None = None) -> tuple[str, int]:
    """(sha256, size) of a good file; otherwise ``discard()`` it and raise CorruptCheckpointError."""
    size = path.stat().st_size
    problem = None
    if transfer_size is not None and size != transfer_size:
        problem = f"transfer cut short: got {size} of {transfer_size} bytes (truncated download)"
    if problem is None:
        try:
            sniff_format(path)
        except CorruptCheckpointError as exc:
            problem = _message(exc).replace(str(path), what)
    if problem is None and source.size is not None and size != source.size:
        problem = f"the file has {size} bytes, checkpoints.yaml pins {source.size}"
    sha = None
    if problem is None:
        sha = sha256_file(path)
        if source.sha256 and sha != source.sha256:
            problem = f"sha256 {sha} does not match the {source.sha256} pinned in checkpoints.yaml"
        elif lfs_sha and sha != lfs_sha:
            problem = f"sha256 {sha} differs from the Hub's LFS hash {lfs_sha} (damaged cache entry)"
    if problem is not None:
        discard()
        message = problem if problem.startswith(what) else f"{what}: {problem}"
        raise CorruptCheckpointError(f"{message}; it was deleted",
                                     hint="run again to download it afresh; if it keeps failing, this source "
                                          "serves a bad file: pass checkpoint=PATH to a file you checked")
    return sha, size


# ---------------------------------------------------------------------------------------------- errors


def _all_failed(model: ModelInfo, variant: Variant, failures: list[tuple[Source, ZooError]],
                offline: bool) -> ZooError:
    what = f"{model.name} (dataset={variant.dataset}, threat={variant.threat})"
    listing = "\n".join(f"  - {src.describe()}: {_message(exc)}" for src, exc in failures)
    fallback = "pass checkpoint=PATH (Python) or --checkpoint PATH (CLI) to a file you downloaded yourself"
    command = f"zoo download {model.name} --dataset {variant.dataset} --threat {variant.threat}"
    if any(isinstance(exc, CorruptCheckpointError) for _, exc in failures):
        again = (f"run `{command}` on a machine with internet (offline mode is on here)" if offline
                 else "run again to download them afresh")
        return CorruptCheckpointError(f"no valid checkpoint for {what}; sources tried:\n{listing}",
                                      hint=f"bad files were deleted: {again}, or {fallback}")
    if offline:
        return OfflineError(
            f"offline mode is on (HF_HUB_OFFLINE=1) and no checkpoint for {what} is cached:\n{listing}",
            hint=f"on a machine with internet run `{command}` with the same HF_HOME / SCORE_ZOO_CACHE and copy "
                 f"the caches here; or unset HF_HUB_OFFLINE to download; or {fallback}")
    return DownloadError(
        f"could not download {what}; sources tried:\n{listing}",
        hint=f"{fallback}; or use a mirror: SCORE_ZOO_HUB_ORG=<org> (Hub organisation) or HF_ENDPOINT=<url>; "
             "without internet, prefetch with `zoo download` elsewhere and set HF_HUB_OFFLINE=1")


def _message(exc: BaseException) -> str:
    """An error's own message, without the ``fix:`` hint and without library boilerplate after line one."""
    text = str(exc).split("\n  fix:", 1)[0].strip() or type(exc).__name__
    return text if isinstance(exc, ZooError) else text.splitlines()[0]


def _as_set(values: Iterable[str] | str | None) -> set[str]:
    if values is None:
        return set()
    return {values} if isinstance(values, str) else set(values)
