"""``python -m imgcls_jax.cli``."""

import sys

from imgcls_jax.cli.main import main

sys.exit(main())
