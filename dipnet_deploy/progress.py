"""The progress contract of the stages that loop over a known collection (calibrate, ptq, quantize,
compare, diagnose): ``progress(iterable, description, total)`` returns the iterable to loop over
(a progress bar wraps it; the default returns it as it is).

``description`` names the loop ("calibrate (min/max)", "compare"...), ``total`` is its length when
known. Stages that report values per step rather than wrap a loop take an event callback instead:
``train``/``finetune`` (iteration, loss, validation entry), ``upscale`` (a tick per frame, from
inside the video decoder), ``bench`` (a message per phase).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

Progress = Callable[[Iterable[T], str, "int | None"], Iterable[T]]


def no_progress(iterable: Iterable[T], _description: str, _total: int | None = None) -> Iterable[T]:
    """The default ``Progress``: the loop as it is."""
    return iterable
