"""One of the processes of tests/test_distributed.py, started with the variables torchrun would set
(RANK, WORLD_SIZE, MASTER_ADDR, ...): trains each config given, in turn, through lmtrain's Python API,
and saves the weights this process ends with, so the test can compare the processes, with the names of
the threads the process still runs once a training has returned.

    MASTER_PORTS=PORT,PORT,... python distributed_worker.py OUT_DIR CONFIG.yaml [CONFIG.yaml ...]

Each training meets the other process on a port of its own: process 0 holds the rendezvous store of
a training until it ends, and the other could reach the old one on a port used again.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from lmtrain.config import load_config  # noqa: E402
from lmtrain.training.trainer import train  # noqa: E402


def main(out_dir: Path, configs: list[str]) -> None:
    torch.set_num_threads(1)  # two processes on a small, busy machine
    for config, port in zip(configs, os.environ["MASTER_PORTS"].split(","), strict=True):
        os.environ["MASTER_PORT"] = port
        result = train(load_config(config), progress_bar=False)
        torch.save(result.model.state_dict(), out_dir / f"{Path(config).stem}-rank{os.environ['RANK']}.pt")
        threads = sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip()
                         for task in os.listdir("/proc/self/task"))
        (out_dir / f"{Path(config).stem}-rank{os.environ['RANK']}.threads").write_text("\n".join(threads))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
