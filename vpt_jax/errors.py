"""The one exception type for a user's mistake (the bottom layer: every layer raises it).

A ``UserError`` says what is wrong with the user's input (config, flags, files,
data) and how to fix it, in one line. The command line prints it as
``run.py: error: <message>`` with exit status 2 and no traceback (``--debug``
shows it); anything else is a bug in vpt-jax and keeps its traceback.
"""


class UserError(ValueError):
  """A problem with the user's input and its fix, e.g. "image_size 0 ...; set ..."."""


class MissingInputError(UserError, FileNotFoundError):
  """A file, folder or prepared dataset the input names is not there (a FileNotFoundError too)."""
