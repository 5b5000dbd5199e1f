"""scas_jax.selection"""
