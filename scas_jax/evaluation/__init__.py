"""scas_jax.evaluation: evaluate a *student* (``scas-jax evaluate``): greedy answers
judged by the rule judge, accuracy with a bootstrap interval, and the student's mean
NLL of the verified answers of a pool."""
