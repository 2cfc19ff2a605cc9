"""`python -m embeddings.gpu_check`: see embeddings/gpu_check/__init__.py and docs/gpu-check.md."""
import sys

from embeddings.gpu_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
