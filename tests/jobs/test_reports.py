"""What long work and results look like to a person: progress with an ETA, numbers that read."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from qsae.jobs.progress import Progress, duration
from qsae.jobs.report import fmt, jsonable


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_logs_at_most_every_interval_with_the_time_left(caplog):
    clock, log = Clock(), logging.getLogger("qsae.test.progress")
    caplog.set_level(logging.INFO, logger="qsae.test.progress")
    p = Progress(64, "capture", "questions", bar=False, logger=log, every=15.0, clock=clock)
    for _ in range(8):  # 8 questions, 5 s each: a line only once 15 s have passed
        clock.t += 5.0
        p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["capture: 3 of 64 questions (5%), 15 s elapsed, about 5 min 05 s left",  # 5 s x 61 to go
                     "capture: 6 of 64 questions (9%), 30 s elapsed, about 4 min 50 s left"]
    clock.t += 290.0
    p.update(56)  # the end is always said
    assert caplog.records[-1].getMessage() == "capture: 64 of 64 questions (100%), 5 min 30 s elapsed, done"


def test_progress_eta_counts_only_this_runs_rate_after_a_resume(caplog):
    clock, log = Clock(), logging.getLogger("qsae.test.progress")
    caplog.set_level(logging.INFO, logger="qsae.test.progress")
    p = Progress(100, "train topk", "steps", bar=False, logger=log, every=0.0, clock=clock, initial=50)
    clock.t += 10.0
    p.update(10)  # 10 steps in 10 s, 40 to go: 40 s (not the 50 resumed steps counted as made in 10 s)
    assert caplog.records[-1].getMessage() == "train topk: 60 of 100 steps (60%), 10 s elapsed, about 40 s left"


@pytest.mark.parametrize("seconds,text", [(0.4, "0 s"), (59.6, "1 min 00 s"), (190, "3 min 10 s"), (3900, "1 h 05 min")])
def test_durations_read(seconds, text):
    assert duration(seconds) == text


def test_numbers_read_and_json_is_plain():
    assert [fmt(x) for x in (0.60145, -14.64276, 2229.0, 1280, float("nan"), None, 0.000123)] == [
        "0.601", "-14.6", "2,229", "1,280", "n/a", "n/a", "1.23e-04"]
    data = {"p": np.float64(0.0123456789), "n": np.int64(3), "a": np.arange(2), "bad": float("nan"), 4: (1, 2)}
    assert json.loads(json.dumps(jsonable(data))) == {"p": 0.0123456789, "n": 3, "a": [0, 1], "bad": None, "4": [1, 2]}
