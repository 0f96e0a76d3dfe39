"""One of the processes of tests/test_distributed.py, started with the variables torchrun would set
(RANK, WORLD_SIZE, MASTER_ADDR, ...): trains each config given, in turn, through lmtrain's Python API,
and saves the weights this process ends with, so the test can compare the processes, with the names of
the threads the process still runs once a training has returned, and again once Python's garbage was
collected.
It ends as a script of one's own should under torchrun (`end_process`). A process that hangs prints
every thread's stack and exits after four minutes, so a failed test shows where.

    MASTER_PORTS=PORT,PORT,... python distributed_worker.py OUT_DIR CONFIG.yaml [CONFIG.yaml ...]

Each training meets the other process on a port of its own: process 0 holds the rendezvous store of
a training until it ends, and the other could reach the old one on a port used again.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from lmtrain.config import load_config  # noqa: E402
from lmtrain.training.distributed import end_process  # noqa: E402
from lmtrain.training.trainer import train  # noqa: E402


def main(out_dir: Path, configs: list[str]) -> None:
    torch.set_num_threads(1)  # two processes on a small, busy machine
    for config, port in zip(configs, os.environ["MASTER_PORTS"].split(","), strict=True):
        os.environ["MASTER_PORT"] = port
        result = train(load_config(config), progress_bar=False)
        name = f"{Path(config).stem}-rank{os.environ['RANK']}"
        torch.save(result.model.state_dict(), out_dir / f"{name}.pt")
        write_threads(out_dir / f"{name}.threads")
        gc.collect()  # as a script's later allocations would, at a moment of their own
        write_threads(out_dir / f"{name}.threads-collected")


def write_threads(path: Path) -> None:
    path.write_text("\n".join(sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip()
                                     for task in os.listdir("/proc/self/task"))))


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(Path(sys.argv[1]), sys.argv[2:])
    end_process(0)
