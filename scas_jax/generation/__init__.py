"""scas_jax.generation: a jitted key/value-cache sampler and ``scas-jax generate``."""
