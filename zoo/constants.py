"""Every environment switch score-zoo reads, in one place (like huggingface_hub's constants)."""

import os
from pathlib import Path

#: Hugging Face organisation substituted for "{org}" in checkpoints.yaml: a lab mirror sets its own.
HUB_ORG_ENV = "SCORE_ZOO_HUB_ORG"
DEFAULT_HUB_ORG = "score-zoo"

#: Where non-Hub downloads (authors' URL, Google Drive) are cached. Hub files use huggingface_hub's
#: own cache, which follows HF_HOME / HF_HUB_CACHE.
CACHE_ENV = "SCORE_ZOO_CACHE"

#: Base URLs of the fallback sources; tests point them at loopback servers.
GDRIVE_URL_ENV = "SCORE_ZOO_GDRIVE_URL"
DEFAULT_GDRIVE_URL = "https://drive.usercontent.google.com/download"

#: Seconds before a non-Hub HTTP request gives up.
HTTP_TIMEOUT_ENV = "SCORE_ZOO_HTTP_TIMEOUT"


#: Seconds torchrun's rank 0, done with its own shard, waits for the other ranks' shards before it stops with
#: the commands that finish the run (resume the missing shards with --shard I/K, then merge).
SHARD_TIMEOUT_ENV = "SCORE_ZOO_SHARD_TIMEOUT"
DEFAULT_SHARD_TIMEOUT = 4 * 3600.0


def shard_timeout() -> float:
    text = os.environ.get(SHARD_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_SHARD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        from zoo.errors import BadInputError
        raise BadInputError(f"{SHARD_TIMEOUT_ENV}={text!r} is not a positive number of seconds",
                            hint=f"unset it (default {DEFAULT_SHARD_TIMEOUT:.0f} s) or set e.g. 7200")
    return value


def hub_org() -> str:
    return os.environ.get(HUB_ORG_ENV) or DEFAULT_HUB_ORG


def hf_offline() -> bool:
    """Mirror huggingface_hub's reading of HF_HUB_OFFLINE, so every source obeys the same switch."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "score-zoo"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "score-zoo"


def gdrive_url() -> str:
    return os.environ.get(GDRIVE_URL_ENV) or DEFAULT_GDRIVE_URL


def http_timeout() -> float:
    return float(os.environ.get(HTTP_TIMEOUT_ENV) or 30)


#: Where the common-corruptions archives come from instead of Zenodo (a mirror, or a test server):
#: ``<base>/<record>/files/<file>``.
ZENODO_URL_ENV = "SCORE_ZOO_ZENODO_URL"
DEFAULT_ZENODO_URL = "https://zenodo.org/records"


def zenodo_url() -> str:
    return (os.environ.get(ZENODO_URL_ENV) or DEFAULT_ZENODO_URL).rstrip("/")


#: A registry file used instead of the packaged checkpoints.yaml (a lab's private list, tests).
REGISTRY_ENV = "SCORE_ZOO_REGISTRY"


def registry_override() -> Path | None:
    explicit = os.environ.get(REGISTRY_ENV)
    if not explicit:
        return None
    path = Path(explicit).expanduser()
    if not path.is_file():
        from .errors import RegistryError
        raise RegistryError(f"${REGISTRY_ENV} points to {path}, which is not a file",
                            hint=f"fix the path or unset {REGISTRY_ENV} to use the packaged checkpoints.yaml")
    return path


def hf_endpoint() -> str | None:
    """HF_ENDPOINT read at call time (huggingface_hub reads it once, at import); None = the library's default."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def hf_hub_cache() -> str | None:
    """The Hub cache folder from HF_HUB_CACHE / HF_HOME, read at call time like ``hf_endpoint``.

    Same precedence as huggingface_hub; None leaves the choice to the library.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expandvars(os.path.expanduser(os.environ[var]))
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return os.path.join(os.path.expandvars(os.path.expanduser(hf_home)), "hub")
    return None
