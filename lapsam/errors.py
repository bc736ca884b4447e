"""Exceptions shared by all parts of lapsam."""

from __future__ import annotations

from pathlib import Path


class LapsamError(Exception):
    """Base class for errors that lapsam reports to users as one line.

    ``lapsam`` exits with :attr:`exit_code` when one reaches the command line.
    """

    exit_code: int = 1


class UsageError(LapsamError):
    """A command cannot start: an input or output path or an argument is wrong.

    Raised by the checks a command makes before any work (exit code 2, as argparse uses).
    """

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM arrived (``docker stop``, a timeout, a job scheduler).

    A :class:`BaseException` like :class:`KeyboardInterrupt`, so per-case ``except Exception``
    handlers do not swallow it, while ``finally`` blocks and :func:`lapsam.writers.atomic_write`
    clean up on the way out. Exit code 143 (128 + SIGTERM).
    """

    exit_code = 143


class CaseError(LapsamError):
    """A case file is unreadable or invalid. The message names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = self.path.name if self.path is not None else "<case>"
        super().__init__(f"{where}: {problem}")


class UnsafePickleError(CaseError):
    """An object key of an npz holds a pickle that references a forbidden global."""


class ModelIntegrityError(LapsamError):
    """A model file is missing or its sha256 does not match the manifest."""
