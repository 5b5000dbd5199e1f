import sys

from scas_jax.cli import main

sys.exit(main())
