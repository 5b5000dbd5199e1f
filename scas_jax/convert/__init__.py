"""scas_jax.convert"""
