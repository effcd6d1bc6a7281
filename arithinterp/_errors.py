"""The one exception type users see.

`ArithInterpError` marks a problem with the user's input (a model spec, a task name, a file, an option) as
opposed to a bug. Its message is a single sentence that names the offending value and says what to do
instead; the CLI prints it on one line and exits with status 2.
"""


class ArithInterpError(Exception):
    """Bad input: the message names the value and what to do instead."""


class ArithInterpWarning(UserWarning):
    """Something the user should look at (e.g. a normalisation with a near-zero denominator)."""
