"""Where worker processes run their model: one CUDA device each, round robin.

`backfill_embeddings --workers N` starts N processes; on a machine with several GPUs each should
have a GPU of its own rather than all of them loading the model on GPU 0. `assign_devices` says
which: worker i gets the i-th of the chosen devices (all visible CUDA devices by default), round
robin when there are more workers than devices.
"""


def parse_devices(raw):
    """'0,2' -> (0, 2); ValueError for anything but distinct non-negative integers."""
    values = tuple(int(part) for part in raw.split(",") if part.strip())
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(raw)
    return values


def cuda_device_count(requested_device):
    """CUDA devices the workers may use: torch's count, or 0 when `requested_device` (the
    EMBEDDING_DEVICE setting) names no CUDA device or torch sees none."""
    if requested_device not in ("auto", "cuda") and not requested_device.startswith("cuda:"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def assign_devices(workers, device_count, chosen=None):
    """The device of each of `workers` workers: "cuda:<index>", or None (the configured device)
    when no CUDA device is counted and none is chosen.

    `chosen` (device indices, from --devices) restricts and orders the devices; ValueError names
    an index that is not among the `device_count` visible.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if chosen:
        missing = [index for index in chosen if index >= device_count]
        if missing:
            visible = f"0 to {device_count - 1}" if device_count else "none"
            raise ValueError(f"CUDA device(s) {', '.join(map(str, missing))} not visible (visible: {visible})")
        indices = list(chosen)
    elif device_count:
        indices = list(range(device_count))
    else:
        return [None] * workers
    return [f"cuda:{indices[worker % len(indices)]}" for worker in range(workers)]
