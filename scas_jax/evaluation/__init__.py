"""scas_jax.evaluation"""
