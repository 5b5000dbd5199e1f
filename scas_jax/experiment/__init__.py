"""scas_jax.experiment: `scas-jax experiment`, selection arms compared by training the student on each and evaluating on held-out questions."""
