"""The error types: `UserError` for bad user input, `Interrupted` for SIGINT/SIGTERM.

Library code raises `UserError` with a single line that names the field, file, row or tensor and says
what to do. Scripts catch it, print `error: <message>` to stderr and exit with code 2 (no traceback), and
turn `Interrupted` into one line and exit code 130 or 143 (`jaxlora.cli.cli_main`, `jaxlora.cli.signals`).
"""


class UserError(ValueError):
    """Bad input from the user: a one-line, actionable message."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not caught by `except Exception`
    """SIGINT or SIGTERM arrived (outside the training loop, which handles them itself)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
