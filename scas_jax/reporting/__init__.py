"""scas_jax.reporting"""
