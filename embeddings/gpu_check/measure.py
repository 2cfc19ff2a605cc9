"""How the GPU check times things: a call run back to back for a budget of seconds, GPU work included."""
import time


class Clock:
    """The run's deadline: a measurement that would start after it is skipped, with the reason."""

    def __init__(self, deadline_s):
        self.deadline_s = deadline_s
        self.started = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.started

    def expired(self):
        return self.elapsed() >= self.deadline_s

    def left(self):
        return max(0.0, self.deadline_s - self.elapsed())


def is_cuda(device):
    return str(device).startswith("cuda")


def synchronise(device):
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """torch.cuda.max_memory_allocated since the last reset, in MiB; None off CUDA."""
    if not is_cuda(device):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def figures(texts, tokens, seconds, calls, peak_mb):
    return {"texts_per_s": round(texts / seconds, 1), "tokens_per_s": round(tokens / seconds),
            "seconds": round(seconds, 3), "calls": calls, "peak_memory_mb": peak_mb}


def rate(call, texts, tokens, device, seconds):
    """Figures of `call()`, which handles `texts` texts of `tokens` tokens, run back to back until
    `seconds` have passed (at least once), each run waited for on the device."""
    synchronise(device)
    reset_peak_memory(device)
    calls, started = 0, time.perf_counter()
    while True:
        call()
        synchronise(device)
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return figures(calls * texts, calls * tokens, elapsed, calls, peak_memory_mb(device))


def is_out_of_memory(exc):
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def free_cuda_memory(device):
    if is_cuda(device):
        import torch

        torch.cuda.empty_cache()
