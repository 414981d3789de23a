"""The CLI's progress sink: bars on a terminal, one plain line per epoch in a log."""

from __future__ import annotations

import io

from nnm.engine.progress import ProgressEvent, TqdmSink


def _run_one_epoch(sink: TqdmSink) -> None:
    sink.stage_started("pretext", 2, 3)
    for step in range(1, 4):
        sink.update(ProgressEvent("pretext", 1, 2, step, 3, loss=1.5, images_per_s=100.0))
    sink.epoch_finished("pretext", 1, {"loss": 1.25, "lr": 0.4, "epoch": 1.0, "seconds": 2.5, "images_per_s": 1234.4})
    sink.stage_finished("pretext", {"epochs": 2})


def test_a_log_gets_one_plain_line_per_epoch_and_no_carriage_returns() -> None:
    log = io.StringIO()
    _run_one_epoch(TqdmSink(stream=log))
    assert log.getvalue() == "pretext epoch 1: 2.5 s, 1234 images/s loss=1.25 lr=0.4\n"


def test_quiet_prints_nothing_and_a_terminal_gets_a_bar_not_lines() -> None:
    quiet = io.StringIO()
    _run_one_epoch(TqdmSink(stream=quiet, enabled=False))
    assert quiet.getvalue() == ""
    term = io.StringIO()
    _run_one_epoch(TqdmSink(stream=term, lines=False))
    assert "\r" in term.getvalue() and "epoch 1:" not in term.getvalue()
