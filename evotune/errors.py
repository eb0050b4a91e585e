"""One exception type for every user-facing failure.

The CLI catches :class:`EvotuneError` and prints its message as one line with a
non-zero exit code and no traceback; anything else is a bug and keeps its
traceback. Messages name the file/key/value at fault and what to do.
"""


class EvotuneError(Exception):
    """A problem with the user's input (config, data, checkpoint, flags)."""
