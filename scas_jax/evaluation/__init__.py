"""scas_jax.evaluation: answer extraction and rule-based judging (``scas-jax verify``)."""

from scas_jax.evaluation.judge import Verdict, judge

__all__ = ["Verdict", "judge"]
