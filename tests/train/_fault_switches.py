"""Fault switches for the child processes of test_nonfinite.py, test_preemption.py and tests/distributed
(installed by _killable_run.main, so `python tests/train/_killable_run.py` and `_dist_child.py` under a
launcher both read them). Only child processes install them; the tests' own process is never patched.

    MT_TEST_STEP_DELAY_S=x     sleep x seconds after each logged step (every process), so a test that signals
                               "after step k" finds the run still going
    MT_TEST_NAN_GRAD=k:RANK    at step k (the k-th window's backward in this process), after the backward and
                               its gradient sync, the first trained parameter's gradient becomes NaN on process
                               RANK only ("all": every process): the processes' own norms then disagree
"""

from __future__ import annotations

import os
import time

import torch


def _delay_steps(seconds: float) -> None:
    from mistral_train.tracking.metrics import MetricsLogger

    real_log = MetricsLogger.log

    def log(self, at_step, metrics):
        row = real_log(self, at_step, metrics)
        time.sleep(seconds)
        return row

    MetricsLogger.log = log


def _nan_grad(step: int, rank: str) -> None:
    from mistral_train.train import loop

    real, calls = loop.backward_window, [0]

    def backward_window(model, *args, **kwargs):
        calls[0] += 1
        if calls[0] != step or rank not in ("all", os.environ.get("RANK", "0")):
            return real(model, *args, **kwargs)
        result = real(model, *args, **kwargs)
        next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return result

    loop.backward_window = backward_window


def install() -> None:
    delay = os.environ.get("MT_TEST_STEP_DELAY_S")
    if delay:
        _delay_steps(float(delay))
    nan_grad = os.environ.get("MT_TEST_NAN_GRAD")
    if nan_grad:
        step, _, rank = nan_grad.partition(":")
        _nan_grad(int(step), rank or "all")
