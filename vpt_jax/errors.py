"""The one exception type for a user's mistake (the bottom layer: every layer raises it).

A ``UserError`` says what is wrong with the user's input (config, flags, files,
data) and how to fix it, in one line. The command line prints it as
``run.py: error: <message>`` with exit status 2 and no traceback (``--debug``
shows it); anything else is a bug in vpt-jax and keeps its traceback.
"""

import difflib


class UserError(ValueError):
  """A problem with the user's input and its fix, e.g. "image_size 0 ...; set ..."."""


class MissingInputError(UserError, FileNotFoundError):
  """A file, folder or prepared dataset the input names is not there (a FileNotFoundError too)."""


def unknown_name(what: str, name: str, valid, aliases=(), *, choices: str,
                 matched=None) -> UserError:
  """The UserError for an unknown ``name`` among ``valid`` (and ``aliases``), naming the
  closest ones: "Unknown <what> 'x' (did you mean a, b?); <choices>". ``matched``:
  the form of ``name`` compared with them (default ``name``; e.g. lower-cased)."""
  close = difflib.get_close_matches(matched or name, list(valid) + list(aliases), n=3)
  hint = f" (did you mean {', '.join(close)}?)" if close else ""
  return UserError(f"Unknown {what} {name!r}{hint}; {choices}")
