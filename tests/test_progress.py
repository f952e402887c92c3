"""The one progress contract: ``ticks`` and ``show`` drive a real tqdm bar as the CLI makes it."""

from __future__ import annotations

import io

from tqdm import tqdm

from dipnet_deploy.progress import no_progress, show, ticks


def test_ticks_count_each_unit_once_and_close_the_bar():
    bars = []

    def progress(iterable, description, total):
        bars.append(tqdm(iterable, desc=description, total=total, file=io.StringIO(), mininterval=0))
        return bars[-1]

    with ticks(progress, "upscale", 5) as tick:
        assert bars[0].n == 0
        for done in range(1, 6):
            tick()
            assert bars[0].n == done  # the unit just finished is counted at once
        assert bars[0].n == 5 and bars[0].disable  # exhausted: closed at 5 of 5
        tick()  # a stream longer than its header said: harmless
        assert bars[0].n == 5
    with ticks(progress, "upscale", 5) as tick:
        tick()
    assert bars[1].n == 1 and bars[1].disable  # left early (an error): closed where it was


def test_ticks_without_a_bar_and_with_an_unknown_total():
    with ticks(no_progress, "upscale", None) as tick:
        for _ in range(3):
            tick()


def test_show_puts_figures_beside_a_bar_and_ignores_a_bare_loop():
    bar = tqdm(range(3), file=io.StringIO())
    show(bar, loss=0.012345, val_drop_db=None)
    assert bar.postfix == "loss=0.01235"
    show(range(3), loss=1.0)  # no bar: nothing to do, no error
