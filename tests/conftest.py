"""Fixtures shared by several test modules (their helpers live in tests/support/)."""

import pytest

from tests.support import helpers as h
from tests.support.servers import DriveServer, HubServer, WebServer, ZooEnv


@pytest.fixture(autouse=True)
def one_thread():
    """Tests use tiny models on 2 shared cores: a second intra-op thread only adds contention."""
    with h.one_thread():
        yield


@pytest.fixture
def synthetic_data_file(tmp_path):
    """8 synthetic images with labels, saved as a zoo-eval ``--data`` file."""
    x, y = h.synthetic_images(8, seed=2)
    return h.write_npz(tmp_path / "d.npz", x, y)


@pytest.fixture
def zoo_env(tmp_path, monkeypatch):
    """Three loopback servers and every environment switch pointing into tmp_path; online by default."""
    hub, web, drive = HubServer(), WebServer(), DriveServer()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "SCORE_ZOO_HUB_ORG", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "zoo-cache"))
    monkeypatch.setenv("SCORE_ZOO_GDRIVE_URL", drive.download_url)
    monkeypatch.setenv("SCORE_ZOO_HUB_ORG", "testorg")
    monkeypatch.setenv("SCORE_ZOO_HTTP_TIMEOUT", "10")
    env = ZooEnv(tmp=tmp_path, hub=hub, web=web, drive=drive, monkeypatch=monkeypatch)
    env.set_offline(False)
    try:
        yield env
    finally:
        env.stop_servers()
