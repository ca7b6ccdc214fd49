"""zoo.fetch end to end against loopback servers: the real hf_hub_download, urllib, caches and checks."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

import zoo
import zoo.fetch
import zoo.registry
from zoo.errors import (ArchitectureMismatchError, CorruptCheckpointError, DownloadError, OfflineError,
                        UnknownModelError, UnknownVariantError)
from zoo.fetch import download, fetch

from tests.support.servers import (DRIVE_ID, FORMATS, HUB_REPO, MODEL, URL_PATH, assert_same_weights,
                                   checkpoint_bytes, sha256, tiny_state)

REPO_CACHE = "models--testorg--tiny-wrn-cifar10-linf"


@pytest.fixture(scope="module")
def state():
    return tiny_state(seed=0)


def _hub_name(fmt: str) -> str:
    return "model.safetensors" if fmt == "safetensors" else f"{fmt}.pt"


def _hub_files(env) -> list[Path]:
    """Blobs and snapshot entries of the test repo in the Hugging Face cache."""
    root = env.hf_cache / REPO_CACHE
    return [p for p in env.files_in(root) if p.parent.name != "refs" and ".no_exist" not in p.parts]


# ------------------------------------------------------------------------------------------------ Hub


@pytest.mark.parametrize("fmt", FORMATS)
def test_hub_download_of_each_upstream_format_gives_the_saved_weights(zoo_env, state, fmt):
    data = checkpoint_bytes(state, fmt)
    commit = zoo_env.hub.add_file(HUB_REPO, _hub_name(fmt), data)
    zoo_env.registry(hub_filename=_hub_name(fmt), sha256={"hub": sha256(data)}, size={"hub": len(data)})

    model = zoo.load(MODEL)

    assert_same_weights(model, state)  # the authors' file also holds 2x "unaveraged" weights: not those
    info = model.checkpoint_info
    assert info.source == f"Hugging Face Hub {HUB_REPO}/{_hub_name(fmt)}@{commit}"
    assert (info.sha256, info.size) == (sha256(data), len(data))
    assert info.path.is_relative_to(zoo_env.hf_cache)
    assert zoo_env.web.requests == [] and zoo_env.drive.requests == []


def test_pinned_revision_is_used_and_an_explicit_revision_overrides_it(zoo_env):
    old, new = tiny_state(1), tiny_state(2)
    first = zoo_env.hub.add_file(HUB_REPO, "model.safetensors", checkpoint_bytes(old, "safetensors"))
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", checkpoint_bytes(new, "safetensors"))
    zoo_env.registry(revision=first)

    assert_same_weights(zoo.load(MODEL), old)
    seen = len(zoo_env.hub.requests)
    assert_same_weights(zoo.load(MODEL), old)
    assert len(zoo_env.hub.requests) == seen  # a cached commit needs no request at all
    assert_same_weights(zoo.load(MODEL, revision="main"), new)


def test_missing_hub_repo_falls_back_to_the_url_and_caches_it(zoo_env, state, caplog):
    data = checkpoint_bytes(state, "authors")
    zoo_env.web.add(URL_PATH, data)
    zoo_env.registry(sha256={"url": sha256(data)})

    with caplog.at_level(logging.WARNING, logger="zoo.fetch"):
        model = zoo.load(MODEL)

    assert_same_weights(model, state)
    assert model.checkpoint_info.source == f"URL {zoo_env.web.url}{URL_PATH}"
    assert model.checkpoint_info.path.is_relative_to(zoo_env.zoo_cache)
    assert "repository testorg/tiny-wrn-cifar10-linf does not exist" in caplog.text
    assert "trying the next source" in caplog.text
    gets = len(zoo_env.web.requests)
    assert_same_weights(zoo.load(MODEL), state)
    assert len(zoo_env.web.requests) == gets  # served from our cache
    assert [p.name for p in zoo_env.files_in(zoo_env.zoo_cache)] == ["tiny_cifar10.pt"]  # no temp files left


@pytest.mark.parametrize("missing, expected", [
    ("file", "has no file 'model.safetensors' at revision 'main'"),
    ("revision", "revision 'v9' does not exist in testorg/tiny-wrn-cifar10-linf"),
])
def test_missing_hub_file_or_revision_falls_back_to_the_url(zoo_env, state, caplog, missing, expected):
    zoo_env.hub.add_file(HUB_REPO, "README.md", b"no weights here\n")
    zoo_env.web.add(URL_PATH, checkpoint_bytes(state, "robustbench"))
    zoo_env.registry(revision="v9" if missing == "revision" else None)

    with caplog.at_level(logging.WARNING, logger="zoo.fetch"):
        assert_same_weights(zoo.load(MODEL), state)
    assert expected in caplog.text


def test_unreachable_hub_falls_back_without_the_libraries_long_retries(zoo_env, state, caplog):
    zoo_env.web.add(URL_PATH, checkpoint_bytes(state, "bare"))
    zoo_env.registry()
    zoo_env.hub.stop()

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="zoo.fetch"):
        assert_same_weights(zoo.load(MODEL), state)
    assert time.monotonic() - start < 15  # huggingface_hub alone backs off for ~25 s
    assert "is unreachable" in caplog.text


# ---------------------------------------------------------------------------------------- Google Drive


@pytest.mark.parametrize("url_failure", ["connection dropped", "server down"])
def test_url_down_falls_back_to_google_drive_through_the_virus_scan_form(zoo_env, state, url_failure):
    zoo_env.web.add(URL_PATH, checkpoint_bytes(state, "authors"), mode="drop")
    if url_failure == "server down":
        zoo_env.web.stop()
    zoo_env.drive.add(DRIVE_ID, checkpoint_bytes(state, "robustbench"), mode="confirm")
    zoo_env.registry()

    model = zoo.load(MODEL)

    assert_same_weights(model, state)
    assert model.checkpoint_info.source == f"Google Drive file {DRIVE_ID}"
    first, second = [parse_qs(urlsplit(path).query) for _, path in zoo_env.drive.requests]
    assert first == {"id": [DRIVE_ID], "export": ["download"]}
    assert second["confirm"] == ["t"] and second["uuid"] == [zoo_env.drive.tokens[DRIVE_ID]]


def test_google_drive_page_without_form_is_confirmed_with_confirm_t(zoo_env, state):
    zoo_env.drive.add(DRIVE_ID, checkpoint_bytes(state, "bare"), mode="confirm-t")
    zoo_env.registry(sources=[{"kind": "gdrive"}])

    assert_same_weights(zoo.load(MODEL), state)
    assert "confirm=t" in zoo_env.drive.requests[-1][1]


@pytest.mark.parametrize("mode, expected", [("quota", "download quota is exceeded"),
                                            ("login", "asks for a sign-in")])
def test_every_source_failing_lists_each_one_and_the_fixes(zoo_env, state, mode, expected):
    zoo_env.drive.add(DRIVE_ID, checkpoint_bytes(state, "bare"), mode=mode)
    zoo_env.registry()  # hub: no such repo; url: 404; drive: refuses

    with pytest.raises(DownloadError) as err:
        zoo.load(MODEL)

    message = str(err.value)
    assert "could not download tiny-wrn (dataset=cifar10, threat=linf)" in message
    assert "Hugging Face Hub testorg/tiny-wrn-cifar10-linf/model.safetensors@main: repository" in message
    assert f"URL {zoo_env.web.url}{URL_PATH}: HTTP 404" in message
    assert f"Google Drive file {DRIVE_ID}: Google Drive" in message and expected in message
    for fix in ("checkpoint=PATH", "--checkpoint PATH", "SCORE_ZOO_HUB_ORG", "HF_ENDPOINT"):
        assert fix in message
    assert zoo_env.files_in(zoo_env.zoo_cache) == []


# ------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize("kind", ["hub", "url"])
@pytest.mark.parametrize("pin", ["sha256", "size"])
def test_file_not_matching_the_registry_pin_is_refused_and_deleted(zoo_env, state, kind, pin):
    data = checkpoint_bytes(state, "authors")
    zoo_env.hub.add_file(HUB_REPO, "model.pt", data)
    zoo_env.web.add(URL_PATH, data)
    wrong = {"sha256": {kind: sha256(b"other weights")}, "size": {kind: len(data) + 1}}[pin]
    zoo_env.registry(sources=[{"kind": kind}], hub_filename="model.pt", **{pin: wrong})

    with pytest.raises(CorruptCheckpointError) as err:
        zoo.load(MODEL)

    message = str(err.value)
    expected = (f"does not match the {wrong[kind]} pinned in checkpoints.yaml" if pin == "sha256"
                else f"has {len(data)} bytes, checkpoints.yaml pins {len(data) + 1}")
    assert expected in message and "it was deleted" in message and "checkpoint=PATH" in message
    assert _hub_files(zoo_env) == [] and zoo_env.files_in(zoo_env.zoo_cache) == []


@pytest.mark.parametrize("kind", ["hub", "url"])
def test_html_page_saved_as_checkpoint_is_refused_and_the_cache_entry_removed(zoo_env, kind):
    page = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>quota</body></html>"
    zoo_env.hub.add_file(HUB_REPO, "model.pt", page)
    zoo_env.web.add(URL_PATH, page, mode="html")
    zoo_env.registry(sources=[{"kind": kind}], hub_filename="model.pt")

    with pytest.raises(CorruptCheckpointError, match="is an HTML page, not a checkpoint"):
        zoo.load(MODEL)

    assert _hub_files(zoo_env) == [] and zoo_env.files_in(zoo_env.zoo_cache) == []
    server = zoo_env.hub if kind == "hub" else zoo_env.web
    gets = sum(method == "GET" for method, _ in server.requests)
    with pytest.raises(CorruptCheckpointError):
        zoo.load(MODEL)
    assert sum(method == "GET" for method, _ in server.requests) == gets + 1  # nothing stale was reused


def test_transfer_cut_short_is_detected_against_content_length(zoo_env, state):
    data = checkpoint_bytes(state, "authors")
    zoo_env.web.add(URL_PATH, data, mode="truncate")
    zoo_env.registry(sources=[{"kind": "url"}])

    with pytest.raises(CorruptCheckpointError) as err:
        zoo.load(MODEL)
    assert f"transfer cut short: got {len(data) // 2} of {len(data)} bytes" in str(err.value)
    assert zoo_env.files_in(zoo_env.zoo_cache) == []


def test_cut_zip_on_the_hub_is_detected_and_removed(zoo_env, state):
    data = checkpoint_bytes(state, "robustbench")
    zoo_env.hub.add_file(HUB_REPO, "model.pt", data[: len(data) * 2 // 3])
    zoo_env.registry(sources=[{"kind": "hub"}], hub_filename="model.pt")

    with pytest.raises(CorruptCheckpointError, match="truncated or damaged torch file"):
        zoo.load(MODEL)
    assert _hub_files(zoo_env) == []


class _RunsCode:
    """Unpickling this calls open(marker, "w"): proof that a loader executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_checkpoint(state, marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": dict(state), "optimizer": _RunsCode(marker)}, buffer)
    return buffer.getvalue()


def test_pickle_that_would_run_code_is_refused_without_running_it(zoo_env, state, tmp_path):
    control = tmp_path / "control-marker"
    torch.load(io.BytesIO(_evil_checkpoint(state, control)), weights_only=False)
    assert control.exists()  # the payload is live when loaded unsafely

    marker = tmp_path / "marker"
    zoo_env.hub.add_file(HUB_REPO, "model.pt", _evil_checkpoint(state, marker))
    zoo_env.registry(sources=[{"kind": "hub"}], hub_filename="model.pt")

    with pytest.raises(CorruptCheckpointError, match="contains pickled code or objects"):
        zoo.load(MODEL)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["hub", "url"])
def test_damaged_cache_entry_is_detected_and_downloaded_again(zoo_env, state, caplog, kind):
    data = checkpoint_bytes(state, "safetensors")
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", data)
    zoo_env.web.add(URL_PATH, data)
    # the Hub blob carries its sha256 in its name; our own cache needs the registry pin
    zoo_env.registry(sources=[{"kind": kind}], sha256={"url": sha256(data)})
    cached = zoo.load(MODEL).checkpoint_info.path.resolve()
    damaged = bytearray(cached.read_bytes())
    damaged[-100:] = bytes(100)  # weights only: the header still parses
    cached.write_bytes(bytes(damaged))

    with caplog.at_level(logging.WARNING, logger="zoo.fetch"):
        model = zoo.load(MODEL)

    assert_same_weights(model, state)
    assert "downloading it again" in caplog.text
    assert model.checkpoint_info.path.resolve().read_bytes() == data


def test_damaged_cache_entry_in_offline_mode_is_deleted_and_reported(zoo_env, state):
    data = checkpoint_bytes(state, "authors")
    zoo_env.web.add(URL_PATH, data)
    zoo_env.registry(sources=[{"kind": "url"}], sha256={"url": sha256(data)})
    cached = zoo.load(MODEL).checkpoint_info.path
    cached.write_bytes(data[:-10] + bytes(10))
    zoo_env.set_offline()

    with pytest.raises(CorruptCheckpointError) as err:
        zoo.load(MODEL)

    message = str(err.value)
    assert f"the cached copy {cached}" in message and "it was deleted" in message
    assert "run `zoo download tiny-wrn --dataset cifar10 --threat linf` on a machine with internet" in message
    assert not cached.exists()
    assert len(zoo_env.web.requests) == 1  # only the first, online, download


def test_checkpoint_of_another_architecture_names_the_keys(zoo_env):
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", checkpoint_bytes(tiny_state(0, depth=16), "safetensors"))
    zoo_env.registry()

    with pytest.raises(ArchitectureMismatchError) as err:
        zoo.load(MODEL)
    assert "unexpected key(s): layer.0.block.1." in str(err.value)
    assert "depth/width" in str(err.value)


def test_checkpoint_path_overrides_every_source(zoo_env, state, tmp_path):
    path = tmp_path / "mine.pt"
    path.write_bytes(checkpoint_bytes(state, "authors"))
    zoo_env.registry()

    model = zoo.load(MODEL, checkpoint=path)

    assert_same_weights(model, state)
    assert model.checkpoint_info.source == "local file"
    assert model.checkpoint_info.sha256 == sha256(path.read_bytes())
    assert zoo_env.all_requests() == []


@pytest.mark.parametrize("progress", [True, False])
def test_large_downloads_show_a_progress_bar_unless_disabled(zoo_env, state, capsys, monkeypatch, progress):
    zoo_env.web.add(URL_PATH, checkpoint_bytes(state, "bare"))
    zoo_env.registry(sources=[{"kind": "url"}])
    monkeypatch.setattr(zoo.fetch, "PROGRESS_MIN_BYTES", 1000)
    monkeypatch.setattr(zoo.fetch, "_stderr_is_terminal", lambda: True)
    model = zoo.registry.info(MODEL)

    fetch(model, model.variant(), progress=progress)

    shown = capsys.readouterr().err
    assert ("tiny_cifar10.pt" in shown and "100%" in shown) == progress


# -------------------------------------------------------------------------------------------- offline


@pytest.mark.parametrize("kind", ["hub", "url", "gdrive"])
def test_offline_mode_loads_the_cached_file_with_every_server_stopped(zoo_env, state, kind):
    data = checkpoint_bytes(state, "authors")
    zoo_env.hub.add_file(HUB_REPO, "model.pt", data)
    zoo_env.web.add(URL_PATH, data)
    zoo_env.drive.add(DRIVE_ID, data)
    zoo_env.registry(sources=[{"kind": kind}], hub_filename="model.pt")
    online = zoo.load(MODEL).checkpoint_info
    zoo_env.stop_servers()
    zoo_env.set_offline()

    model = zoo.load(MODEL)

    assert_same_weights(model, state)
    assert model.checkpoint_info == dataclasses.replace(online, provenance="local-pin")   # pinned on first use


def test_offline_mode_works_in_a_fresh_process(zoo_env, state, tmp_path):
    """HF_HUB_OFFLINE set before huggingface_hub is imported, as on a compute node."""
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", checkpoint_bytes(state, "safetensors"))
    zoo_env.registry()
    download([MODEL])
    zoo_env.stop_servers()
    out = tmp_path / "weights.pt"
    script = ("import sys, torch, zoo; m = zoo.load('tiny-wrn'); torch.save(m.state_dict(), sys.argv[1]); "
              "print(m.checkpoint_info.source)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Hugging Face Hub {HUB_REPO}/model.safetensors@")
    saved = torch.load(out, weights_only=True)
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], v) for k, v in state.items())


@pytest.mark.parametrize("before_import", [True, False], ids=["set-in-shell", "set-after-import"])
def test_offline_mode_with_nothing_cached_says_to_run_zoo_download(zoo_env, before_import):
    zoo_env.registry()
    zoo_env.set_offline(before_import=before_import)

    with pytest.raises(OfflineError) as err:
        zoo.load(MODEL)

    message = str(err.value)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "`zoo download tiny-wrn --dataset cifar10 --threat linf`" in message
    assert "unset HF_HUB_OFFLINE" in message
    assert "is not in the Hugging Face cache" in message and "not in the score-zoo cache" in message
    assert zoo_env.all_requests() == []  # offline means no request at all


# ------------------------------------------------------------------------------------------- download


def test_download_prefetches_and_checks_names_before_fetching(zoo_env, state):
    data = checkpoint_bytes(state, "safetensors")
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", data)
    zoo_env.registry()

    (got,) = download(MODEL, datasets=["cifar10"], threats="linf")
    assert (got.sha256, got.size) == (sha256(data), len(data))

    before = len(zoo_env.all_requests())
    with pytest.raises(UnknownVariantError) as err:
        download([MODEL], datasets="cifar100")
    assert "available: dataset='cifar10' threat='linf'" in str(err.value)
    with pytest.raises(UnknownModelError, match="did you mean tiny-wrn"):
        download([MODEL, "tiny-wnr"])
    assert len(zoo_env.all_requests()) == before

