"""One exception type for problems the user can fix (bad paths, data, config values).

`main.py` prints these as a one-line message instead of a traceback, so the message must name the
file or config key at fault and say what to do.
"""


class UserError(Exception):
  """A problem with the user's input: the message is shown as is, without a traceback."""


class ConfigError(UserError):
  """A config value is missing, of the wrong type or out of range; the message names the key."""


class DataError(UserError):
  """The data on disk cannot be used; the message names the path."""
