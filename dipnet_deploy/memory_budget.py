"""The memory budget: what one input may cost a command, estimated from its header before anything is decoded.

The budget is ``DIPNET_MAX_MEMORY_MB`` MiB (default ``DEFAULT_MAX_MEMORY_MB``): ``max_memory_bytes``. Processes
that work at once on one machine share it (``share_budget``: each of ``compare --workers N``'s pool processes
checks its images against a 1/N share), so N workers never take N budgets between them. ``refuse_over_budget``
is the one refusal: a line naming the input, its size, the estimate and the setting that would allow it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from dipnet_deploy.errors import InputError

MAX_MEMORY_VARIABLE = "DIPNET_MAX_MEMORY_MB"
# What one image may cost a command, estimated from its header before decoding: decoding it, its pixels, the
# outputs and working buffers that grow with it. What the model fixes whatever the image (the interpreter and
# libraries, the runtime's session, a tile's buffers) comes on top: about 680 MiB for upscale or compare with a
# one-Conv 1080p x2 model, whose largest run this default accepts (a 2200x36000 image) peaked at 1.38 GB.
DEFAULT_MAX_MEMORY_MB = 700.0
MAX_MEMORY_MB_LIMIT = 2.0**43  # a budget is below this many MiB (8 EiB: beyond any machine; keeps the bytes an int64)
MIB = 1 << 20

# a plain decimal number in ASCII digits: ``float`` also takes 5_0, digits of other scripts, spaces, exponents,
# nan and inf, none of which a user means as a size
PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")

_shares = 1  # processes of one command that work at once, each within its share of the budget


def max_memory_bytes() -> int:
    """The whole budget, in bytes: ``DIPNET_MAX_MEMORY_MB`` MiB (default ``DEFAULT_MAX_MEMORY_MB``)."""
    return int(positive_setting(MAX_MEMORY_VARIABLE, DEFAULT_MAX_MEMORY_MB, "MiB", MAX_MEMORY_MB_LIMIT) * MIB)


def positive_setting(variable: str, default: float, unit: str, limit: float = math.inf) -> float:
    """The positive plain decimal number (``PLAIN_NUMBER``) below ``limit`` that the environment variable
    ``variable`` holds, or ``default`` when it is unset or empty; InputError naming the variable otherwise."""
    text = os.environ.get(variable, "")
    if not text:
        return default
    value = float(text) if PLAIN_NUMBER.fullmatch(text) else math.nan
    if not 0 < value < limit:
        raise InputError(variable, f"{text!r} is not a positive number of {unit}")
    return value


def share_budget(processes: int) -> None:
    """From now on this process is one of ``processes`` working at once on the machine: it refuses what would
    take more than its share, ``max_memory_bytes() // processes`` (a pool process calls this as it starts)."""
    global _shares
    _shares = max(1, int(processes))


def budget_share() -> int:
    """The bytes this process may spend on one input: the budget, or its share of it (``share_budget``)."""
    return max_memory_bytes() // _shares


def refuse_over_budget(where: str | Path, subject: str, need: int, what: str) -> None:
    """Refuse ``where`` (an input) when ``need`` bytes, the estimate of what ``what`` (e.g. "upscale it x2") takes
    for ``subject`` (its size, e.g. "2000x1500 (3.0 megapixels)"), are over this process's share of the budget:
    one line with the estimate and the value of ``DIPNET_MAX_MEMORY_MB`` that would allow it."""
    budget = max_memory_bytes()
    if need <= budget // _shares:
        return
    if _shares == 1:
        over, setting = f"over the {budget / MIB:,.0f} MiB budget", f"{math.ceil(need / MIB)} or more to allow it"
    else:  # each worker's share: the whole budget must be that many times the estimate
        over = (f"over the {budget // _shares / MIB:,.0f} MiB share each of the {_shares} workers running at once "
                f"has of the {budget / MIB:,.0f} MiB budget")
        setting = f"{math.ceil(need * _shares / MIB)} or more to allow it, or run fewer workers"
    raise InputError(where, f"{subject} would take about {need / MIB:,.0f} MiB of memory to {what}, {over} "
                            f"(set {MAX_MEMORY_VARIABLE} to {setting})")
