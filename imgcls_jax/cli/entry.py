"""``main``: run one ``imgcls-jax`` command, a user's mistake as one line (exit status 2)."""

from __future__ import annotations

import logging
import sys
import traceback

from imgcls_jax.cli.errors import _message, is_user_error
from imgcls_jax.cli.parser import build_parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("jax", "absl", "tensorflow", "orbax", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None, *, train_defaults: dict | None = None, train_prog: str | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0, 1 (a
    command's own "failed", e.g. ``audit --strict`` with warnings), or 2 (a user's mistake,
    printed as one line). A failure of the program itself raises (a traceback).
    ``train_defaults``, ``train_prog``: see :func:`~imgcls_jax.cli.parser.build_parser`."""
    verbose = False
    try:
        args = build_parser(train_defaults, train_prog).parse_args(argv)
        verbose = args.verbose
        _setup_logging(verbose)
        return args.func(args)
    except Exception as e:
        if not is_user_error(e):
            raise
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        print(f"imgcls-jax: error: {_message(e)}", file=sys.stderr)
        return 2
