"""scas_jax.generation"""
