"""Errors a user can act on.

Everything that is the user's fault (a bad config value, a malformed data file, a missing dataset)
raises a subclass of `UserError` whose message is one self-contained paragraph: what is wrong, where,
and what to do. `run.py` prints that paragraph and exits non-zero instead of showing a traceback.
"""


class UserError(Exception):
  """An error caused by the user's input; its message says how to fix it."""


class ConfigError(UserError):
  """A config value is unknown, of the wrong type or out of range."""


class DataError(UserError):
  """A dataset is missing, incomplete or malformed."""
