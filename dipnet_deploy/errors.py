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


class WriteError(InputError):
    """An output could not be stored (full disk, quota, file-size limit, read-only device): it ends the run,
    where a bad input among several is only skipped."""
