"""scas_jax.models"""
