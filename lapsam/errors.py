"""Exceptions shared by all parts of lapsam."""

from __future__ import annotations

from pathlib import Path


class LapsamError(Exception):
    """Base class for errors that lapsam reports to users as one line."""


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
