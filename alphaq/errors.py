"""The one exception type for user mistakes.

The CLI turns an AlphaQError into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""


class AlphaQError(Exception):
    """A user-facing error: the message names the offending value and what is allowed."""
