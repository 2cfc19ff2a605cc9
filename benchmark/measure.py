"""Small measuring tools shared by the suites: timers, peak memory, percentiles."""
import threading
import time
from contextlib import contextmanager

import numpy as np

RSS_SAMPLE_SECONDS = 0.01


def percentile_ms(seconds, q):
    """The `q`th percentile of durations `seconds`, in milliseconds."""
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


def per_second(count, seconds):
    return count / seconds if seconds > 0 else float("inf")


def synchronise(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class _RssSampler(threading.Thread):
    """Samples the process's resident memory until stopped; keeps the peak."""

    def __init__(self):
        super().__init__(name="benchmark-rss", daemon=True)
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(RSS_SAMPLE_SECONDS):
            self.peak = max(self.peak, self.process.memory_info().rss)


@contextmanager
def peak_memory(device):
    """Yields a dict whose `mb` is, after the block, the peak memory it used.

    CUDA: peak memory allocated by torch on the device. CPU: peak resident memory of the whole
    process (model and data included), sampled every 10 ms.
    """
    result = {"mb": None}
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        yield result
        result["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    sampler = _RssSampler()
    sampler.start()
    try:
        yield result
    finally:
        sampler.stopped.set()
        sampler.join()
        result["mb"] = max(sampler.peak, sampler.process.memory_info().rss) / 2**20


def timed(call, device="cpu"):
    """(seconds, peak memory in MB) of `call()`, GPU work included."""
    with peak_memory(device) as memory:
        synchronise(device)
        started = time.perf_counter()
        call()
        synchronise(device)
        seconds = time.perf_counter() - started
    return seconds, memory["mb"]
