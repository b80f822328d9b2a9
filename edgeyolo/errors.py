"""The one error type the CLI turns into a single clear line and exit status 2."""


class EdgeYoloError(Exception):
    """A problem with the user's input (file, option, data), not a bug.

    The message is meant to be shown as is: one line that says what is wrong
    and, where possible, what to do about it.
    """


class AccuracyGateError(EdgeYoloError):
    """A build whose measured accuracy drop exceeds the allowed budget (exit status 1)."""

    exit_code = 1
