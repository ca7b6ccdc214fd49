"""Loopback stand-ins for the Hugging Face Hub, the authors' web server and Google Drive (tests only).

The real clients talk to them — huggingface_hub's ``hf_hub_download`` / ``HfApi`` and zoo.fetch's urllib
code — so the tests exercise the real request/response handling, caches and error mapping, offline.

- ``HubServer``: ``HEAD/GET /{repo}/resolve/{revision}/{path}`` with ``X-Repo-Commit``, ``ETag`` (quoted git
  sha1, or sha256 plus ``X-Linked-Etag``/``X-Linked-Size`` for LFS-like files) and 404s carrying
  ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`` as the Hub sends them; plus the write
  API ``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` use (repos/create, validate-yaml,
  preupload answering "regular" so files travel base64-inline in the NDJSON commit, branch, commit).
- ``WebServer``: plain GET of files, per path mode ok | truncate | html | drop | missing.
- ``DriveServer``: ``GET /download?id=..&export=download`` with Drive's "can't scan for viruses" form
  (hidden id/export/confirm/uuid), the older confirm=t variant, quota and sign-in pages.

Also: tiny WideResNet checkpoints in each upstream format and ``ZooEnv``, behind the ``zoo_env`` fixture
(tests/conftest.py) wiring everything (HF_ENDPOINT, HF_HOME, SCORE_ZOO_CACHE, SCORE_ZOO_GDRIVE_URL,
SCORE_ZOO_REGISTRY) into tmp_path.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml

from zoo.models import WideResNet

# ------------------------------------------------------------------------------------------ servers


class _Handler(BaseHTTPRequestHandler):
    server_app: "LoopbackServer"  # set on the per-server subclass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server_app.requests.append((method, self.path))
        self.server_app.handle(self, method, body)

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False,
              content_type: str = "application/octet-stream", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def reply_json(self, status: int, payload, headers: dict | None = None) -> None:
        self.reply(status, json.dumps(payload).encode(), headers, content_type="application/json")

    def log_message(self, *args):  # keep pytest output clean
        pass


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (free port). Subclasses implement ``handle``."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        handler = type(f"{type(self).__name__}Handler", (_Handler,), {"server_app": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        self.running = True

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self.running:
            if self._thread.is_alive():  # (at interpreter exit daemon threads are gone: shutdown would block)
                self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self.running = False

    def handle(self, req: _Handler, method: str, body: bytes) -> None:
        raise NotImplementedError


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)           # branch -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}


_LFS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class HubServer(LoopbackServer):
    """The parts of the Hugging Face Hub that hf_hub_download and HfApi's commit path use."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.commit_payloads: list[list[dict]] = []
        self._lock = threading.Lock()
        super().__init__()

    # -- state, for tests
    def add_file(self, repo_id: str, path: str, data: bytes, branch: str = "main") -> str:
        """Commit ``data`` as ``path`` (creating repo and branch as needed); returns the new commit sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            return self._new_commit(repo, branch, {path: data})

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]

    @staticmethod
    def _new_commit(repo: _Repo, branch: str, changes: dict[str, bytes | None]) -> str:
        parent = repo.branches.get(branch) or repo.branches.get("main")
        files = dict(repo.commits[parent]) if parent else {}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = data
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    # -- HTTP
    def handle(self, req: _Handler, method: str, body: bytes) -> None:
        parts = [unquote(p) for p in urlsplit(req.path).path.split("/")[1:]]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(req, method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        if method == "POST" and parts[:3] == ["api", "repos", "create"]:
            return self._create_repo(req, json.loads(body or b"{}"))
        if method == "POST" and parts[:2] == ["api", "validate-yaml"]:
            return self._validate_yaml(req, json.loads(body or b"{}"))
        if method == "GET" and len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            return self._repo_info(req, f"{parts[2]}/{parts[3]}", parts[5])
        if method == "POST" and len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            actions = {"preupload": self._preupload, "commit": self._commit_files, "branch": self._branch}
            if action in actions:
                return actions[action](req, repo_id, rev, body)
        req.reply(404, b"Not Found", content_type="text/plain")

    def _not_found(self, req: _Handler, code: str, message: str, commit: str | None = None, head=False) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        req.reply(404, message.encode(), headers, head=head, content_type="text/plain")

    def _lookup(self, repo_id: str, revision: str) -> tuple[_Repo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        return repo, repo.branches.get(revision) or (revision if revision in repo.commits else None)

    def _resolve(self, req: _Handler, method: str, repo_id: str, revision: str, path: str) -> None:
        head = method == "HEAD"
        with self._lock:
            repo, commit = self._lookup(repo_id, revision)
            if repo is None:
                return self._not_found(req, "RepoNotFound", "Repository not found", head=head)
            if commit is None:
                return self._not_found(req, "RevisionNotFound", "Invalid rev id: " + revision, head=head)
            data = repo.commits[commit].get(path)
        if data is None:
            return self._not_found(req, "EntryNotFound", "Entry not found", commit=commit, head=head)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if path.endswith(_LFS_SUFFIXES):  # what .gitattributes routes to LFS: etag = sha256 of the content
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha1(data)}"'
        req.reply(200, data, headers, head=head)

    def _repo_info(self, req: _Handler, repo_id: str, revision: str) -> None:
        """``HfApi.repo_info``: create_commit asks for it when every file is unchanged (no-op commit)."""
        with self._lock:
            repo, commit = self._lookup(repo_id, revision)
            if repo is None:
                return self._not_found(req, "RepoNotFound", "Repository not found")
            if commit is None:
                return self._not_found(req, "RevisionNotFound", "Invalid rev id: " + revision)
            siblings = [{"rfilename": path} for path in sorted(repo.commits[commit])]
        req.reply_json(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                             "siblings": siblings})

    def _create_repo(self, req: _Handler, payload: dict) -> None:
        repo_id = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self._lock:
            if repo_id in self.repos:
                return req.reply_json(409, {"error": "You already created this model repo",
                                            "url": f"{self.url}/{repo_id}"})
            repo = self.repos[repo_id] = _Repo(private=payload.get("visibility") == "private")
            self._new_commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        req.reply_json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def _validate_yaml(self, req: _Handler, payload: dict) -> None:
        content = payload.get("content", "")
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content.split("\n---\n", 1)[0][4:])
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        req.reply_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, req: _Handler, repo_id: str, rev: str, body: bytes) -> None:
        with self._lock:
            repo, commit = self._lookup(repo_id, rev)
            if repo is None:
                return self._not_found(req, "RepoNotFound", "Repository not found")
            if commit is None:
                return self._not_found(req, "RevisionNotFound", "Invalid rev id: " + rev)
            existing = repo.commits[commit]
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None}
                 for f in json.loads(body)["files"]]
        req.reply_json(200, {"files": files, "commitOid": commit})

    def _commit_files(self, req: _Handler, repo_id: str, rev: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if "create_pr" in urlsplit(req.path).query:
            return req.reply_json(400, {"error": "pull requests are not emulated"})
        if not lines or lines[0].get("key") != "header":
            return req.reply_json(400, {"error": "missing header line"})
        changes: dict[str, bytes | None] = {}
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file" and value.get("encoding") == "base64":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                changes[value["path"]] = None
            else:
                return req.reply_json(400, {"error": f"operation {item['key']!r} is not emulated"})
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._not_found(req, "RepoNotFound", "Repository not found")
            if rev not in repo.branches:
                return self._not_found(req, "RevisionNotFound", "Invalid rev id: " + rev)
            sha = self._new_commit(repo, rev, changes)
            self.commit_payloads.append(lines)
        req.reply_json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None, "success": True})

    def _branch(self, req: _Handler, repo_id: str, branch: str, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._not_found(req, "RepoNotFound", "Repository not found")
            if branch in repo.branches:
                return req.reply_json(409, {"error": "Reference already exists"})
            _, start = self._lookup(repo_id, payload.get("startingPoint") or "main")
            repo.branches[branch] = start
        req.reply_json(200, {})


class WebServer(LoopbackServer):
    """The authors' web server: plain GET; per-path ``modes`` simulate its failures."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}  # path -> ok | truncate | html | drop | missing
        super().__init__()

    def add(self, path: str, data: bytes, mode: str = "ok") -> str:
        self.files[path], self.modes[path] = data, mode
        return f"{self.url}{path}"

    def handle(self, req: _Handler, method: str, body: bytes) -> None:
        path = urlsplit(req.path).path
        mode = self.modes.get(path, "missing")
        data = self.files.get(path, b"")
        if mode == "missing":
            return req.reply(404, b"<html><body>404 Not Found</body></html>", content_type="text/html")
        if mode == "drop":  # close the connection without an answer
            req.close_connection = True
            return
        if mode == "html":
            page = b"<!DOCTYPE html><html><head><title>Access denied</title></head><body>Login</body></html>"
            return req.reply(200, page, content_type="text/html; charset=utf-8")
        if mode == "truncate":  # announce the full length, send half, hang up
            return req.reply(200, data[: len(data) // 2], length=len(data))
        req.reply(200, data, head=method == "HEAD")


_VIRUS_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><p class="uc-warning-subcaption">Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" class="goog-inline-block jfk-button" value="Download anyway"/>
<input type="hidden" name="id" value="{file_id}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="{uuid}">
</form></div></body></html>"""
_OLD_WARNING_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<p>Google Drive can't scan this file for viruses. <a href="/download?id={file_id}&amp;export=download&amp;confirm=t">
Download anyway</a></p></body></html>"""
_QUOTA_PAGE = """<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>
<p>Sorry, you can't view or download this file at this time.</p><p>Too many users have viewed or downloaded this
file recently. Please try accessing the file again later.</p></body></html>"""
_LOGIN_PAGE = """<!DOCTYPE html><html><head><title>Sign in - Google Accounts</title></head><body>
<form action="https://accounts.google.com/v3/signin/identifier" method="post"><input name="identifier"></form>
</body></html>"""


class DriveServer(LoopbackServer):
    """Google Drive's download endpoint, modes: direct | confirm (form) | confirm-t (old page) | quota | login."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        super().__init__()

    @property
    def download_url(self) -> str:
        return f"{self.url}/download"

    def add(self, file_id: str, data: bytes, mode: str = "confirm") -> None:
        self.files[file_id], self.modes[file_id] = data, mode
        self.tokens[file_id] = str(uuid.uuid4())

    def handle(self, req: _Handler, method: str, body: bytes) -> None:
        url = urlsplit(req.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        file_id = query.get("id", "")
        if url.path != "/download" or file_id not in self.files:
            return req.reply(404, b"<html><body>Not found</body></html>", content_type="text/html")
        mode = self.modes[file_id]
        page = None
        if mode == "quota":
            page = _QUOTA_PAGE
        elif mode == "login":
            page = _LOGIN_PAGE
        elif mode == "confirm" and not (query.get("confirm") and query.get("uuid") == self.tokens[file_id]):
            page = _VIRUS_PAGE.format(action=self.download_url, file_id=file_id, uuid=self.tokens[file_id])
        elif mode == "confirm-t" and query.get("confirm") != "t":
            page = _OLD_WARNING_PAGE.format(file_id=file_id)
        if page is not None:
            return req.reply(200, page.encode(), content_type="text/html; charset=utf-8")
        req.reply(200, self.files[file_id],
                  {"Content-Disposition": f'attachment; filename="{file_id}.pt"'})


# ------------------------------------------------------------------------------------ checkpoints

FORMATS = ("authors", "robustbench", "bare", "safetensors")


def tiny_net(seed: int = 0, depth: int = 10, width: int = 1, num_classes: int = 10) -> WideResNet:
    """A WideResNet-10-1 with random weights *and* BN statistics, so every tensor matters in comparisons."""
    gen = torch.Generator().manual_seed(seed)
    net = WideResNet(num_classes=num_classes, depth=depth, width=width)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=gen) + 0.5 if "running_var" in name else \
                    torch.randn(tensor.shape, generator=gen) * 0.1
                tensor.copy_(values)
            else:
                tensor.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
    return net.eval()


def tiny_state(seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_net(seed, **kwargs).state_dict().items()}


def checkpoint_bytes(state: dict[str, torch.Tensor], fmt: str) -> bytes:
    """``state`` saved the way one upstream saves it."""
    if fmt == "safetensors":
        from safetensors.torch import save
        return save({k: v.contiguous() for k, v in state.items()})
    if fmt == "authors":  # SCORE's train script: EMA + raw weights, DataParallel(Sequential(normalize?, net))
        obj = {"model_state_dict": {f"module.0.{k}": v for k, v in state.items()},
               "unaveraged_model_state_dict": {f"module.0.{k}": v * 2 for k, v in state.items()}}
    elif fmt == "robustbench":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif fmt == "bare":
        obj = dict(state)
    else:
        raise ValueError(fmt)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


# ------------------------------------------------------------------------------------------ fixture

MODEL = "tiny-wrn"
HUB_REPO = "testorg/tiny-wrn-cifar10-linf"
URL_PATH = "/checkpoints/CIFAR-10/tiny_cifar10.pt"
DRIVE_ID = "1AbC-dEf_123"
_counter = itertools.count()


@dataclass
class ZooEnv:
    tmp: Path
    hub: HubServer
    web: WebServer
    drive: DriveServer
    monkeypatch: pytest.MonkeyPatch

    def registry(self, sources: list[dict] | None = None, *, hub_filename: str = "model.safetensors",
                 revision: str | None = None, sha256: dict | None = None, size: dict | None = None,
                 reported: dict | None = None) -> Path:
        """Write a one-model registry (WRN-10-1, cifar10/linf) whose sources point at the loopback servers.

        ``sources`` defaults to hub, url, gdrive in that order; ``sha256``/``size`` pin per kind.
        """
        sha256, size = sha256 or {}, size or {}
        defaults = {
            "hub": {"kind": "hub", "repo_id": "{org}/tiny-wrn-cifar10-linf", "filename": hub_filename,
                    "revision": revision},
            "url": {"kind": "url", "url": f"{self.web.url}{URL_PATH}"},
            "gdrive": {"kind": "gdrive", "file_id": DRIVE_ID},
        }
        chosen = sources if sources is not None else [{"kind": k} for k in ("hub", "url", "gdrive")]
        raw_sources = []
        for spec in chosen:
            entry = {**defaults[spec["kind"]], **spec}
            entry.setdefault("sha256", sha256.get(entry["kind"]))
            entry.setdefault("size", size.get(entry["kind"]))
            raw_sources.append(entry)
        doc = {"schema_version": 1, "models": {MODEL: {
            "robustbench_id": "Tiny2024Test_WRN10_1",
            "paper": {"title": "A tiny test network", "authors": ["A. Tester"], "venue": "Tests 2024",
                      "link": "https://example.org/paper", "code": "https://example.org/code"},
            "training": {"additional_data": False, "footnote": None},
            "architecture": {"name": "dm_wide_resnet", "label": "WideResNet-10-1", "depth": 10, "width": 1,
                             "activation": "silu"},
            "variants": [{"dataset": "cifar10", "threat": "linf", "eps": "8/255", "num_classes": 10,
                          "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616],
                          "reported": reported or {"clean_acc": 81.25, "autoattack_acc": 42.5},
                          "sources": raw_sources}],
        }}}
        path = self.tmp / f"registry-{next(_counter)}.yaml"  # a new path each time: load_registry caches by path
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.monkeypatch.setenv("SCORE_ZOO_REGISTRY", str(path))
        return path

    @property
    def hf_cache(self) -> Path:
        return self.tmp / "hf" / "hub"

    @property
    def zoo_cache(self) -> Path:
        return self.tmp / "zoo-cache"

    def set_offline(self, offline: bool = True, *, before_import: bool = True) -> None:
        """HF_HUB_OFFLINE as a user sets it. huggingface_hub reads it once, at import: ``before_import``
        mirrors the value into the library (set in the shell), otherwise only the environment changes
        (set later, e.g. in a notebook)."""
        import huggingface_hub.constants as hf_constants
        if offline:
            self.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        else:
            self.monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        self.monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline if before_import else False)

    def stop_servers(self) -> None:
        for server in (self.hub, self.web, self.drive):
            server.stop()

    def all_requests(self) -> list[tuple[str, str]]:
        return self.hub.requests + self.web.requests + self.drive.requests

    def files_in(self, root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()) if root.exists() else []
