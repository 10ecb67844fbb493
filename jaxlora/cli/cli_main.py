"""`cli_main`: what every script's `main` is wrapped in (scripts/*.py, the `jaxlora` console script).

Library code raises `jaxlora.errors.UserError` with a single line that names the field, file, row or
tensor and says what to do; here it becomes `error: <message>` on stderr and exit code 2 (no traceback).
SIGINT and SIGTERM become one line and exit code 130 or 143 at any moment (`jaxlora.cli.signals`).
"""

import os
import signal
import sys
from collections.abc import Callable
from functools import wraps

from jaxlora.cli.signals import install_interrupt_handlers
from jaxlora.errors import Interrupted, UserError


def cli_main(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Wrap a script's main so a `UserError` becomes one line on stderr and exit code 2, and SIGINT or
    SIGTERM one line and exit code 128 + the signal's number."""

    @wraps(fn)
    def run() -> None:
        install_interrupt_handlers()
        # transformers' advice that PyTorch is missing: jaxlora never needs PyTorch
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        try:
            code = fn()
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except (Interrupted, KeyboardInterrupt) as err:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the exit
            signum = getattr(err, "signum", signal.SIGINT)
            print(f"interrupted by {signal.Signals(signum).name}; stopped", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)  # no waiting on background threads (data workers, orbax)
        sys.exit(code or 0)

    return run
