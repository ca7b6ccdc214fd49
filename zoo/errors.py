"""One error hierarchy: every failure a user can fix is a ZooError carrying the fix.

The CLIs turn a ZooError into its message and exit code 2 (``run_cli``); anything else is a bug and keeps
its traceback.
"""

import sys
from collections.abc import Callable


class ZooError(Exception):
    """Base class. ``hint`` says what to do about it and is appended to the message."""

    def __init__(self, message: str, hint: str | None = None):
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  fix: {hint}")


class UnknownModelError(ZooError, KeyError):
    """No registry entry (or RobustBench id) has this name."""

    __str__ = Exception.__str__  # KeyError would quote the whole message


class UnknownVariantError(ZooError, KeyError):
    """The model exists, but not for the requested dataset / threat."""

    __str__ = Exception.__str__


class RegistryError(ZooError):
    """checkpoints.yaml does not follow the schema."""


class DownloadError(ZooError):
    """No source could deliver the file (network, missing repo, HTTP error)."""


class OfflineError(DownloadError):
    """Offline mode is on and the file is not cached."""


class CorruptCheckpointError(ZooError):
    """A file is not the checkpoint it should be: wrong hash/size, HTML page, truncated, unsafe pickle."""


class ArchitectureMismatchError(ZooError):
    """A state dict does not fit the architecture: names the missing / unexpected / reshaped keys."""


class BadInputError(ZooError, ValueError):
    """Invalid user input (CLI flags, data files, model outputs) detected before any work is done."""

    __str__ = Exception.__str__


class DataError(BadInputError):
    """Evaluation data that cannot be used: a missing or malformed file, labels the model cannot output."""


class RunStateError(BadInputError):
    """A run folder or shard state that cannot be resumed or merged as asked (other configuration, gaps,
    unfinished shards)."""


class RecordError(BadInputError):
    """A result record (JSON and its .npz) that is unreadable, malformed or inconsistent."""


def run_cli(prog: str | Callable[[], str], body: Callable[[], int]) -> int:
    """Run a console command's body: a ZooError becomes one message on stderr and exit code 2.

    argparse's own exits pass through (0 for --help, 2 for a usage error it has already printed).
    ``prog`` may be a callable so the message can name a subcommand parsed inside ``body``.
    """
    try:
        return body()
    except ZooError as exc:
        print(f"{prog() if callable(prog) else prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
