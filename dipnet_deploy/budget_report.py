"""The report's account of a quality budget's search (``quantize --max-drop``): which tensors are not int8,
and the trade-off from pure int8 to fp32 as a table and a drop-vs-latency chart.

Conventions: ``entry`` is the int8 model card's ``mixed_precision`` (``budget.budget_card``), read from a
file the user holds: ``budget_entry`` keeps it only when it has that form, so a damaged card shows
nothing rather than failing the report.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

BUDGET_HEAD = ("step", "taken out of int8", "val drop (dB)", "latency per 1080p frame (s)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def budget_entry(card: dict) -> dict | None:
    """The card's ``mixed_precision`` when it has the form ``budget.budget_card`` writes, else None."""
    entry = card.get("mixed_precision") if isinstance(card, dict) else None
    try:
        ok = (isinstance(entry["tensors_out_of_int8"], list) and all(isinstance(t, str) for t in entry["tensors_out_of_int8"])
              and isinstance(entry["fp32"], bool) and _number(entry["max_drop_db"])
              and _number(entry["fp32_latency_1080p_s"]) and isinstance(entry["steps"], list)
              and all(isinstance(s, list) and len(s) == 3 and isinstance(s[0], str) and _number(s[1]) and _number(s[2])
                      for s in entry["steps"]))
    except (KeyError, TypeError):
        return None
    return entry if ok else None


def not_int8_text(entry: dict) -> str:
    """One sentence naming what a budget took out of int8."""
    if entry["fp32"]:
        return (f"The quality budget ({entry['max_drop_db']} dB) needed the fp32 model itself: no tensor is int8 "
                "(`quantize --max-drop`).")
    tensors = entry["tensors_out_of_int8"]
    if not tensors:
        return f"The quality budget ({entry['max_drop_db']} dB) kept every tensor in int8 (`quantize --max-drop`)."
    return (f"{len(tensors)} activation tensor(s) are not int8 (`quantize --max-drop {entry['max_drop_db']}`, "
            f"fallback {entry.get('fallback', 'float')}): {', '.join(tensors)}.")


def budget_rows(entry: dict) -> list[list[str]]:
    return [[str(index), step[0], f"{step[1]:.4f}", f"{step[2]:.3f}"] for index, step in enumerate(entry["steps"])]


def budget_chart(entry: dict) -> bytes:
    """PNG bytes: the validation drop against the latency of each step of the search, pure int8 to the end,
    with fp32 (drop 0) and the budget marked. Made in memory: embedded in the page only."""
    steps = entry["steps"]
    fig = Figure(figsize=(7, 3.8), dpi=110)
    ax = fig.subplots()
    ax.plot([s[2] for s in steps], [s[1] for s in steps], "o-", color="#d62728", label="search steps")
    ax.plot([steps[0][2]], [steps[0][1]], "s", color="#d62728", label="pure int8")
    ax.plot([entry["fp32_latency_1080p_s"]], [0], "D", color="#1f77b4", label="fp32")
    ax.axhline(entry["max_drop_db"], color="#7f7f7f", linestyle="--", label="budget")
    ax.set_xlabel("latency per 1080p frame (s), this machine")
    ax.set_ylabel("mean PSNR-Y drop on --val (dB)")
    ax.set_title("Quality budget: drop against latency, step by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
