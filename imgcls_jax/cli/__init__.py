"""The ``imgcls-jax`` command: train, evaluate, predict, audit, port-weights, tune.

Every subcommand has ``--help``. Runs are folders written by ``train`` (see
:mod:`imgcls_jax.train.loop`); ``evaluate`` and ``predict`` read them back.

A user's mistake is one line on stderr, ``imgcls-jax: error: ...``, and exit status 2 (with
``--verbose``, its traceback first); anything else is a failure of the program and keeps its
traceback (exit status 1). A mistake is (see :func:`is_user_error`):

* a bad flag or argument (argparse);
* an exception of a class that only input can cause, wherever it is raised: :data:`USER_ERRORS`
  (an invalid config or tune file, a dataset or manifest that cannot be used, a folder that is not
  a run, a weight file that cannot be read or found, an image that cannot be decoded, a bad
  search space);
* a ``ValueError`` or ``OSError`` (a missing or unreadable file, ...) raised while a command
  reads its arguments and input files, before it trains, evaluates or predicts
  (:func:`reading_input`). The same exception raised later, inside a run, is a failure.
"""

from imgcls_jax.cli.commands import train_config
from imgcls_jax.cli.entry import main
from imgcls_jax.cli.errors import USER_ERRORS, UsageError, is_user_error, reading_input, user_error_classes
from imgcls_jax.cli.parser import build_parser

__all__ = [
    "USER_ERRORS",
    "UsageError",
    "build_parser",
    "is_user_error",
    "main",
    "reading_input",
    "train_config",
    "user_error_classes",
]
