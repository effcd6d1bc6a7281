"""The one exception type users see.

`ArithInterpError` marks a problem with the user's input (a model spec, a task name, a file, an option) as
opposed to a bug. Its message is a single sentence that names the offending value and says what to do
instead; the CLI prints it on one line and exits with status 2.
"""


class ArithInterpError(Exception):
    """Bad input: the message names the value and what to do instead."""


class ArithInterpWarning(UserWarning):
    """Something the user should look at (e.g. a normalisation with a near-zero denominator)."""


def check_choice(name: str, value: str, choices) -> None:
    """Refuse `value` unless it is one of `choices`, naming the option and the values it takes."""
    if value not in choices:
        raise ArithInterpError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}.")
