"""The one error type for bad user input.

Library code raises `UserError` with a single line that names the field, file, row or tensor and says
what to do. Scripts catch it, print `error: <message>` to stderr and exit with code 2 (no traceback).
"""

import sys
from collections.abc import Callable
from functools import wraps


class UserError(ValueError):
    """Bad input from the user: a one-line, actionable message."""


def cli_main(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Wrap a script's main so a `UserError` becomes one line on stderr and exit code 2."""

    @wraps(fn)
    def run() -> None:
        try:
            code = fn()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        sys.exit(code or 0)

    return run
