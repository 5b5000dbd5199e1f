"""scas_jax: Student-Centric Answer Sampling (SCAS) for LLM distillation, in JAX/Flax."""

__version__ = "0.1.0"
