"""`mistral-train KEY=VALUE ...` in one launched process, for tests/distributed.

    accelerate launch --config_file configs/accelerate/NAME.yaml tests/distributed/_dist_child.py KEY=VALUE ...
    torchrun --nproc_per_node N tests/distributed/_dist_child.py KEY=VALUE ...

The same as `-m mistral_train`, with one intra-op thread per process (two processes share two
cores; one thread also keeps the reduction order fixed from run to run). It is the resume tests'
child, tests/train/_killable_run.py, under a launcher; its environment switches apply, e.g.
    MT_TEST_STALL_AFTER_STEP=k   after logging step k, every process waits to be killed (the test
                                 SIGKILLs the launcher and every rank), so "killed after step k"
                                 never finds the run already over.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # run as a script: no package to import from
from _killable_run import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
