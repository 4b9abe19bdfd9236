"""This machine's memory bandwidth, measured: the time to read (sum) and to copy a buffer far larger than any
cache, all threads, median of repeats. Decode at batch 1 reads every active weight once per token, so
(active weight bytes / step time) over the read bandwidth says how close a decode step is to the machine's
limit."""

from __future__ import annotations

import statistics
import time

import torch


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> dict:
    """Read and copy bandwidth of `device`'s memory (host RAM, or a GPU's HBM for "cuda")."""
    n = int(gib * 2 ** 30) // 4
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    reads, copies = [], []
    for _ in range(repeats + 1):                # the first round warms pages and threads
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        y.copy_(x)
        sync()
        copies.append(time.perf_counter() - t)
    nbytes = 4 * n
    return {"buffer_gib": gib, "threads": torch.get_num_threads(), "device": device,
            "read_gbps": nbytes / statistics.median(reads[1:]) / 1e9,
            "copy_gbps": 2 * nbytes / statistics.median(copies[1:]) / 1e9}
