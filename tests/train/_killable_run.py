"""`mistral-train KEY=VALUE ...` in this process, with kill points for test_resume_kill.py.

    python tests/train/_killable_run.py KEY=VALUE ...

Only the test's child process runs this; the package is patched here, never in the tests'
own process. Environment:
    MT_TEST_STALL_AFTER_STEP=k      after logging step k, sleep until killed, so a parent that
                                    kills "somewhere after step j < k" never finds the run over;
                                    gives up when its parent dies, or after 10 minutes
    MT_TEST_KILL_IN_WRITE=MODE:N    SIGKILL this process while checkpoint `step_N` is written:
        weights  inside the safetensors write: the file is written, cut to half its length
                 (what a kill in the middle of the write leaves), then the process dies
        rename   after every file of step_N is written, just before its temp folder is
                 renamed into place (the folder looks complete but is not yet published)
A kill point that is never reached lets the run finish (exit 0); the test then fails, so a
refactor that bypasses these writers cannot make the test pass vacuously.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import torch


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is delivered before this returns; never reached


def _kill_in_write(mode: str, step: int) -> None:
    # Temp folders are ".step_N.tmp-*" (nested writers add leading dots: "..step_N.tmp-*.tmp-*").
    in_temp_of_step = re.compile(rf"^\.+step_{step}\.tmp-")
    if mode == "weights":
        # Patched before mistral_train (and accelerate) import it by name.
        import safetensors.torch

        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save_file(tensors, filename, *args, **kwargs)
            path = Path(filename)
            if in_temp_of_step.match(path.parent.name):
                with path.open("r+b") as handle:
                    handle.truncate(path.stat().st_size // 2)
                _die()

        safetensors.torch.save_file = save_file
    elif mode == "rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            # Only the publishing rename ".step_N.tmp-*" -> "step_N"; not the nested writer's
            # rename into the outer temp folder, nor moving an old step_N aside.
            if Path(dst).name == f"step_{step}" and re.match(rf"^\.step_{step}\.tmp-", Path(src).name):
                _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        raise ValueError(f"MT_TEST_KILL_IN_WRITE={mode}:{step}: mode must be 'weights' or 'rename'")


def _stall_after(step: int) -> None:
    from mistral_train.tracking.metrics import MetricsLogger

    real_log = MetricsLogger.log

    def log(self, at_step, metrics):
        row = real_log(self, at_step, metrics)
        if int(at_step) == step:
            parent, deadline = os.getppid(), time.monotonic() + 600
            while os.getppid() == parent and time.monotonic() < deadline:  # gone with the test or the launcher
                time.sleep(0.05)
            raise SystemExit(f"_killable_run: nobody killed this process while step {step} was stalled")
        return row

    MetricsLogger.log = log


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)  # bit-identical runs need the same reduction order every time
    kill = os.environ.get("MT_TEST_KILL_IN_WRITE")
    if kill:
        mode, _, step = kill.partition(":")
        _kill_in_write(mode, int(step))
    stall = os.environ.get("MT_TEST_STALL_AFTER_STEP")
    if stall:
        _stall_after(int(stall))
    sys.path.insert(0, str(Path(__file__).parent))  # under a launcher this file is imported, not run
    from _fault_switches import install  # MT_TEST_STEP_DELAY_S, MT_TEST_NAN_GRAD (test_nonfinite, test_preemption)

    install()
    from mistral_train.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
