"""scas_jax: Student-Centric Answer Sampling (SCAS) for LLM distillation, in JAX/Flax."""

import os as _os

# scas_jax uses transformers for tokenizers and configs only, never its models, so the
# advice transformers prints on import when PyTorch is absent ("Models won't be
# available") does not apply; a user's own setting of the variable wins.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
