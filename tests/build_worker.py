"""One process of tests/test_kernel_build.py: builds (or loads) tests/tiny_extension.cpp with
`-DANSWER=N` through lmtrain.speed.kernel_build, then prints `answer N` or `unavailable: REASON`.

    python tests/build_worker.py ROOT ANSWER WAIT_SECONDS
"""

import signal
import sys
from pathlib import Path

from lmtrain.speed import kernel_build

SOURCE = Path(__file__).with_name("tiny_extension.cpp")


def main() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, even when the tests run under nohup
    root, answer, wait = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    spec = kernel_build.Spec("tiny", (SOURCE,), cflags=(f"-DANSWER={answer}",))
    module, reason = kernel_build.obtain(spec, announce=lambda line: print(line, file=sys.stderr, flush=True),
                                         wait_seconds=wait, root=root)
    print(f"answer {module.answer()}" if module is not None else f"unavailable: {reason}", flush=True)


if __name__ == "__main__":
    main()
