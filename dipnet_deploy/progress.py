"""The one progress contract of every stage: ``progress(iterable, description, total)`` returns the
iterable to loop over (a progress bar wraps it; the default, ``no_progress``, returns it as it is).

``description`` names the loop ("calibrate (min/max)", "compare", "train"...; its first word tells
the bar its unit), ``total`` is its length when known. Two helpers keep stages on that one shape:
``show(loop, **figures)`` puts running figures (a loss, a validation score) beside the bar wrapping
``loop`` when it can show them, and ``with ticks(progress, description, total) as tick`` drives
the contract from work counted deep inside other loops (frames inside videos): ``tick()`` per unit.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

Progress = Callable[[Iterable[T], str, "int | None"], Iterable[T]]


def no_progress(iterable: Iterable[T], _description: str, _total: int | None = None) -> Iterable[T]:
    """The default ``Progress``: the loop as it is."""
    return iterable


def show(loop: Iterable, **figures: float | None) -> None:
    """Show ``figures`` (None ones left out) beside the bar wrapping ``loop``; nothing for a bare loop."""
    set_postfix = getattr(loop, "set_postfix", None)  # what tqdm, the CLI's bar, offers
    if set_postfix is not None:
        set_postfix({name: f"{value:.4g}" for name, value in figures.items() if value is not None}, refresh=False)


@contextlib.contextmanager
def ticks(progress: Progress, description: str, total: int | None) -> Iterator[Callable[[], None]]:
    """A function to call once per unit of work done, counted through ``progress`` over ``total`` units
    (None: unknown); calls beyond ``total`` are harmless. Leaving the block closes the loop (and its bar,
    before an error is printed)."""
    units = itertools.repeat(None, total) if total is not None else itertools.repeat(None)
    loop = iter(progress(units, description, total))
    next(loop, None)  # a wrapped loop counts an item when the next one is asked for: ask for the first now
    try:
        yield lambda: next(loop, None)
    finally:
        close = getattr(loop, "close", None)  # a generator's: runs the wrapper's own clean-up
        if close is not None:
            close()
