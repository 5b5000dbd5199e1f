"""scas_jax.training"""
