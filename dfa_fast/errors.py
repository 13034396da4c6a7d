"""The error users see: one line that says what was wrong and what was expected."""


class DfaError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2."""
