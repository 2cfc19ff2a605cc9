"""What the figures were measured on: CPU, cores, memory, GPU, and the software versions."""
import os
import platform
from importlib import metadata
from pathlib import Path

from django.db import connections


def cpu_model():
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores():
    """Cores this process may run on (the affinity mask), which can be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def gpu():
    """(name, memory in GiB, CUDA version) of the first CUDA device, or (None, None, None)."""
    import torch

    if not torch.cuda.is_available():
        return None, None, None
    properties = torch.cuda.get_device_properties(0)
    return properties.name, round(properties.total_memory / 2**30, 1), torch.version.cuda


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def database_versions(using="default"):
    """(PostgreSQL version, pgvector version) of the database `using`."""
    with connections[using].cursor() as cursor:
        cursor.execute("SHOW server_version")
        server = cursor.fetchone()[0]
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
    return server, row[0] if row else None


def describe(using="default"):
    """The machine and software, as a dict for the report's `machine` key."""
    import psutil
    import torch

    gpu_name, gpu_memory, cuda = gpu()
    postgres, pgvector = database_versions(using)
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name,
        "gpu_memory_gb": gpu_memory,
        "cuda": cuda,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": _version("sentence-transformers"),
        "transformers": _version("transformers"),
        "postgresql": postgres,
        "pgvector": pgvector,
        "os": platform.platform(terse=True),
    }
