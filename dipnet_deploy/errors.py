"""The one error type the CLI turns into a single stderr line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: names the file (or option) and the problem."""

    def __init__(self, where: str | Path, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = str(where)
        self.problem = problem

    def __reduce__(self):  # rebuilt from both fields when it crosses a process boundary (a pool worker's error)
        return type(self), (self.where, self.problem)


class RunEndingError(InputError):
    """A failure no later input of the run could escape: it ends the run, where a bad input among several is
    only skipped."""


class WriteError(RunEndingError):
    """An output could not be stored (full disk, quota, file-size limit, read-only device)."""


class OutOfMemoryError(RunEndingError):
    """A runtime could not allocate the memory a forward of the model (named by ``where``) needs."""
