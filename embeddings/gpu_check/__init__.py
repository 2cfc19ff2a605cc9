"""The GPU throughput check: `python -m embeddings.gpu_check`, in one command on a bare GPU machine.

It measures how fast the encode pipeline embeds transcript segments with a model of
BAAI/bge-small-en-v1.5's exact shape (random weights from a fixed seed: the real model's compute,
meaningless vectors), side by side in one run:

- plain `SentenceTransformer.encode` against the project's pipeline (`embeddings.pipeline.encode`),
  texts/s and tokens/s, over a sweep of texts per model call, in fp32 and (on CUDA) fp16, with the peak
  GPU memory of each configuration;
- tokenization alone with 1, 2, ... threads up to the CPUs (`tokenization_scaling`), beside the
  tokenization the pipeline ran before (`model.preprocess`, one thread);
- the stages alone at the best configuration: tokenization (the pipeline's own tokenizer threads),
  the host-to-device copy, the model's forward pass on tensors already on the device; the slowest
  of them names what limits the pipeline;
- a backfill's claims encoded in a call each and streamed into one pipeline, against one call;
- each chosen GPU alone, then all of them together (one spawned worker process per device);
- the machine: device names, library versions, CUDA version, CPU count, the date.

Each measurement runs for a budget of seconds after a warm-up, and the whole run has a deadline,
so it ends in minutes. `--quick` measures the same figures on the CPU over a few texts (the test
suite runs it). It needs only torch, transformers, sentence-transformers and numpy: no Django, no
database, no download. The tokenizer is the uncased BERT WordPiece vocabulary that bge-small uses
(a copy of all-MiniLM-L6-v2's files in `tokenizer/`); the texts are the demo segments'
(`segments.demo_data`). docs/gpu-check.md tells how to carry it to a GPU machine and read it.
"""
from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
