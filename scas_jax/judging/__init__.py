"""scas_jax.judging: answer extraction and rule-based judging (``scas-jax verify``)."""

from scas_jax.judging.judge import Verdict, judge

__all__ = ["Verdict", "judge"]
