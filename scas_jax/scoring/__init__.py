"""scas_jax.scoring"""
