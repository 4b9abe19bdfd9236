"""One rank of `python -m runtime.run` with a fault injected, for tests/test_parallel.py; not a test module.

    python tests/fault_rank.py RANK:STEPS[:hang] [runtime.run arguments ...]

The fault is test code, not a hook in the product: this wrapper replaces `Parallel.broadcast_tokens` so that
rank RANK exits (status 1, like a crashed process) or hangs at its STEPS-th token broadcast, i.e. mid-decode,
then runs the CLI's `main` unchanged. The other ranks must stop with one line within the collective timeout.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    spec, args = sys.argv[1], sys.argv[2:]
    rank, steps, *kind = spec.split(":")
    from runtime.parallel import comm

    real = comm.Parallel.broadcast_tokens
    seen = [0]

    def broadcast_tokens(self, tokens):
        if self.distributed and self.rank == int(rank):
            seen[0] += 1
            if seen[0] >= int(steps):
                if kind and kind[0] == "hang":
                    time.sleep(10 ** 6)
                os._exit(1)
        return real(self, tokens)

    comm.Parallel.broadcast_tokens = broadcast_tokens
    from runtime.run import main as run_main

    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
