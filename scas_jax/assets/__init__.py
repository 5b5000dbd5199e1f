"""Data shipped with scas_jax: the GSM8K multi-teacher pool (MIT, see gsm8k/LICENSE)."""

from pathlib import Path

GSM8K_POOL = Path(__file__).resolve().parent / "gsm8k"
