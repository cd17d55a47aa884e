"""`mistral-train KEY=VALUE ...` in one launched process, for tests/distributed.

    accelerate launch --config_file configs/accelerate/NAME.yaml tests/distributed/_dist_child.py KEY=VALUE ...
    torchrun --nproc_per_node N tests/distributed/_dist_child.py KEY=VALUE ...

The same as `-m mistral_train`, with one intra-op thread per process (two processes share two
cores; one thread also keeps the reduction order fixed from run to run). Environment:
    MT_TEST_STALL_AFTER_STEP=k   after logging step k, every process waits to be killed (the test
                                 SIGKILLs the launcher and every rank), so "killed after step k"
                                 never finds the run already over. Gives up when its launcher dies, or
                                 after 10 minutes.
"""

from __future__ import annotations

import os
import sys
import time

import torch


def _stall_after(step: int) -> None:
    from mistral_train.tracking import MetricsLogger

    real_log = MetricsLogger.log

    def log(self, at_step, metrics):
        row = real_log(self, at_step, metrics)
        if int(at_step) == step:
            parent, deadline = os.getppid(), time.monotonic() + 600
            while os.getppid() == parent and time.monotonic() < deadline:  # gone with its launcher
                time.sleep(0.05)
            raise SystemExit(f"_dist_child: nobody killed this process after step {step}")
        return row

    MetricsLogger.log = log


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    stall = os.environ.get("MT_TEST_STALL_AFTER_STEP")
    if stall:
        _stall_after(int(stall))
    from mistral_train.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
