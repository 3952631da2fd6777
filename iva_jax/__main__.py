"""`python -m iva_jax` prints the environment report (same as `python -m iva_jax.env`)."""

import sys

from iva_jax.env import main

sys.exit(main())
