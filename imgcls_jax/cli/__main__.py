"""``python -m imgcls_jax.cli``."""

import sys

from imgcls_jax.cli.entry import main

sys.exit(main())
