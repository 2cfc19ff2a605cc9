"""Randomly initialised models of a real model's shape, for speed figures where the weights are absent.

`build_shaped_encoder("bge-small")` is a BERT with BAAI/bge-small-en-v1.5's exact configuration
(12 layers, hidden 384, intermediate 1536, 12 heads, the uncased 30,522-token vocabulary, 512
positions) and random weights from a fixed seed, wrapped as bge wraps it: a SentenceTransformer
of Transformer, Pooling (CLS) and Normalize modules. It costs the same compute per text as the
real model, so its speed is the real model's speed; its vectors are meaningless.

The weights are written to a temporary directory with the tokenizer files and loaded back through
sentence-transformers' ordinary `Transformer(path)`, the path a real model takes (same attention
implementation, same preprocessing). Nothing is downloaded.

No Django here: `python -m embeddings.gpu_check` runs on machines that have only torch,
transformers and sentence-transformers.
"""
import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

MEANINGLESS = "random weights: speed figures only, its vectors and scores are meaningless"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")  # what an uncased BERT tokenizer loads from


@dataclass(frozen=True)
class Shape:
    description: str
    stands_for: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int = 30522
    positions: int = 512

    def bert_config(self, **extra):
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=self.intermediate,
            max_position_embeddings=self.positions, type_vocab_size=2, **extra,
        )

    def as_dict(self):
        return {"stands_for": self.stands_for, "layers": self.layers, "hidden": self.hidden,
                "intermediate": self.intermediate, "heads": self.heads, "vocab": self.vocab,
                "positions": self.positions}


SHAPES = {
    "bge-small": Shape("BAAI/bge-small-en-v1.5's shape", "BAAI/bge-small-en-v1.5", 12, 384, 1536, 12),
}
# The reranker stand-in used with each shape.
RERANKER_SHAPES = {
    "bge-small": Shape("BERT-base shape, bge-reranker-base's compute class", "BAAI/bge-reranker-base", 12, 768, 3072, 12),
}


@contextlib.contextmanager
def quiet_transformers(reports=True):
    """No progress bars while loading; with `reports`, no load reports either (for random
    weights, missing weights are expected)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    st_logger = logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    hf_logging.disable_progress_bar()
    if reports:
        hf_logging.set_verbosity_error()
        st_logger.setLevel(logging.ERROR)  # "Converting SentenceTransformer model ... to CrossEncoder"
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
        st_logger.setLevel(st_level)


def check_tokenizer(directory):
    """Raise FileNotFoundError naming the fix when `directory` lacks the tokenizer files."""
    missing = [name for name in TOKENIZER_FILES if not (Path(directory) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks the tokenizer file(s) {', '.join(missing)}: copy them from any uncased "
            "BERT tokenizer (all-MiniLM-L6-v2's or bge-small-en-v1.5's) into that directory."
        )


def _write_random_model(shape, tokenizer, directory, seed):
    """Save a BertModel of `shape` with weights drawn from `seed`, and the tokenizer files, in `directory`."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    BertModel(shape.bert_config(), add_pooling_layer=False).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer) / name, Path(directory) / name)


def _modules():
    """sentence-transformers' Transformer, Pooling and Normalize modules: from where 6.2 and later keep
    them, else from `sentence_transformers.models` (6.0-6.1, which a GPU machine's image may hold)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def build_shaped_encoder(shape_name, device="cpu", seed=0, tokenizer=None):
    """A SentenceTransformer of `shape_name`'s configuration with random weights from `seed`, on
    `device`. `tokenizer`: a directory holding TOKENIZER_FILES of an uncased BERT tokenizer."""
    from sentence_transformers import SentenceTransformer

    shape = SHAPES[shape_name]
    check_tokenizer(tokenizer)
    Transformer, Pooling, Normalize = _modules()
    with quiet_transformers(), tempfile.TemporaryDirectory(prefix="shaped-encoder-") as directory:
        _write_random_model(shape, tokenizer, directory, seed)
        transformer = Transformer(directory, max_seq_length=shape.positions)
    return SentenceTransformer(modules=[transformer, Pooling(shape.hidden, "cls"), Normalize()], device=device)
