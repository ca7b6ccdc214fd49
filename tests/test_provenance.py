"""Where the weights came from and how far they are trusted: pinned releases, trust on first use, local files."""

import logging

import pytest

import zoo
from tests.support.servers import HUB_REPO, MODEL, checkpoint_bytes, sha256, tiny_state
from zoo import pins
from zoo.cli import main as zoo_main
from zoo.errors import CorruptCheckpointError


def _hub_only(env, **pinned):
    env.registry(sources=[{"kind": "hub"}], **pinned)


def test_unpinned_download_is_pinned_on_first_use_and_a_changed_file_is_refused(zoo_env):
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", checkpoint_bytes(tiny_state(0), "safetensors"))
    _hub_only(zoo_env)
    got = zoo.load(MODEL).checkpoint_info
    assert got.provenance == "first-use" and pins.pins_path().is_file()
    assert zoo.load(MODEL).checkpoint_info.provenance == "local-pin"

    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", checkpoint_bytes(tiny_state(1), "safetensors"))
    with pytest.raises(CorruptCheckpointError, match="the weights changed since") as info:
        zoo.load(MODEL)
    assert got.sha256 in str(info.value) and "--forget-pins" in str(info.value)

    assert zoo_main(["download", MODEL, "--forget-pins"]) == 0   # an intended upstream change
    assert zoo.load(MODEL).checkpoint_info.provenance == "local-pin"


def test_a_pinned_release_says_so(zoo_env):
    data = checkpoint_bytes(tiny_state(0), "safetensors")
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", data)
    _hub_only(zoo_env, sha256={"hub": sha256(data)}, size={"hub": len(data)})
    assert zoo.load(MODEL).checkpoint_info.provenance == "pinned"
    assert not pins.pins_path().exists()   # nothing to trust on first use


def test_a_local_file_is_a_release_only_when_its_hash_is_pinned(zoo_env, tmp_path, caplog):
    data = checkpoint_bytes(tiny_state(0), "safetensors")
    _hub_only(zoo_env, sha256={"hub": sha256(data)})
    released = tmp_path / "released.safetensors"
    released.write_bytes(data)
    other = tmp_path / "other.safetensors"
    other.write_bytes(checkpoint_bytes(tiny_state(1), "safetensors"))
    assert zoo.load(MODEL, checkpoint=released).checkpoint_info.provenance == "local-release"
    with caplog.at_level(logging.WARNING, logger="zoo.fetch"):
        assert zoo.load(MODEL, checkpoint=other).checkpoint_info.provenance == "local-unverified"
    assert "is not the released checkpoint" in caplog.text and sha256(data) in caplog.text


def test_download_prints_the_pins_to_paste(zoo_env, capsys):
    data = checkpoint_bytes(tiny_state(0), "safetensors")
    zoo_env.hub.add_file(HUB_REPO, "model.safetensors", data)
    _hub_only(zoo_env)
    assert zoo_main(["download", MODEL, "--print-pins"]) == 0
    out = capsys.readouterr().out
    assert f"sha256: {sha256(data)}" in out and f"size: {len(data)}" in out and "(first-use)" in out
