"""The exception types: AlphaQError (and its kinds) for user mistakes, InternalError for bugs.

The CLI turns an AlphaQError into a single line on stderr and exit code 2. Anything else is a
bug: the CLI prints one line saying so and exits with 1; ``alphaq --debug`` shows the traceback.
The Python front door (alphaq.api) raises the same types, so callers can catch the kind they
care about (``except alphaq.BudgetError``) or every user mistake (``except alphaq.AlphaQError``).
"""


class AlphaQError(Exception):
    """A user-facing error: the message names the offending value and what is allowed."""


class InputError(AlphaQError):
    """The model, a file or a path given is missing, unreadable or not what alphaq reads."""


class BudgetError(AlphaQError):
    """The budget cannot be met (or exceeds what the candidate types can use) for this model."""


class QuantizeError(AlphaQError):
    """llama.cpp's quantiser refused or failed; the message carries its reason."""


class InternalError(RuntimeError):
    """A broken invariant inside alphaq (a bug, never the user's input)."""
