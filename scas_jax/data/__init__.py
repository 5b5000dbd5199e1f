"""scas_jax.data"""
