"""What the GPU check measures with: the model, the texts, and the machine they run on."""
import datetime
import itertools
import os
import platform
from importlib import metadata

from embeddings import shapes
from embeddings.gpu_check import TOKENIZER_DIR

SHAPE = "bge-small"
TEXTS_SOURCE = "segments.demo_data.generate_segments: the demo segments' texts and length distribution"
DTYPES = {"fp32": "float32", "fp16": "float16"}


def build_model(device, seed=0):
    """The bge-small-shaped SentenceTransformer (random weights from `seed`) on `device`, in eval mode."""
    model = shapes.build_shaped_encoder(SHAPE, device, seed, tokenizer=str(TOKENIZER_DIR))
    model.eval()
    return model


def set_dtype(model, dtype):
    """Put `model` in `dtype` ("fp32" or "fp16")."""
    import torch

    model.to(getattr(torch, DTYPES[dtype]))


def model_description(model, seed):
    shape = shapes.SHAPES[SHAPE]
    return {"shape": shape.description, **shape.as_dict(), "pooling": "CLS, then Normalize (as bge)",
            "max_seq_length": model.max_seq_length, "weights": f"seed {seed}, {shapes.MEANINGLESS}",
            "tokenizer": "uncased BERT WordPiece, 30,522 tokens (all-MiniLM-L6-v2's files, bge-small's vocabulary)"}


def segment_texts(count, seed=0):
    """`count` texts of the demo segments: their lengths, their edge cases (a blank, emoji,
    non-Latin scripts and, from 50 texts on, a very long one the tokenizer truncates)."""
    from segments.demo_data import generate_segments

    return [row["text"] for row in itertools.islice(generate_segments(count, seed), count)]


def token_counts(model, texts):
    """Tokens the model sees for each text (special tokens included, truncated as it truncates)."""
    encoded = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)
    return [len(ids) for ids in encoded["input_ids"]]


def texts_description(texts, counts):
    ordered = sorted(counts)
    return {"count": len(texts), "source": TEXTS_SOURCE, "total_tokens": sum(counts),
            "mean_chars": round(sum(map(len, texts)) / len(texts), 1),
            "mean_tokens": round(sum(counts) / len(counts), 1),
            "p50_tokens": ordered[len(ordered) // 2], "p95_tokens": ordered[int(len(ordered) * 0.95)],
            "max_tokens": ordered[-1]}


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or None


def _usable_cpus():
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count()


def _gpu(index):
    import torch

    properties = torch.cuda.get_device_properties(index)
    return {"index": index, "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "capability": f"{properties.major}.{properties.minor}"}


def gpus():
    import torch

    return [_gpu(index) for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def machine():
    """The machine and the libraries the figures were measured with."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpus": gpus(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "cpus_usable": _usable_cpus(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": _version("transformers"), "sentence_transformers": _version("sentence-transformers"),
        "tokenizers": _version("tokenizers"), "numpy": _version("numpy"),
        "torch_threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset (the tokenizer uses every core)"),
    }
