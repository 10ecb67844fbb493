"""The one error type for bad user input.

Library code raises `UserError` with a single line that names the field, file, row or tensor and says
what to do. Scripts catch it, print `error: <message>` to stderr and exit with code 2 (no traceback).
Scripts also turn SIGINT and SIGTERM into one line and exit code 130 or 143 at any moment; the training
loop takes the signals over while it runs (it saves a checkpoint first) and reads `pending_signal()`, so
a signal whose exception something swallowed (a finalizer, a callback) still stops the run.
"""

import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import wraps


class UserError(ValueError):
    """Bad input from the user: a one-line, actionable message."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not caught by `except Exception`
    """SIGINT or SIGTERM arrived (outside the training loop, which handles them itself)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received = 0  # the last SIGINT/SIGTERM this process got, 0 if none


def pending_signal() -> int:
    """The SIGINT/SIGTERM this process received, even one whose `Interrupted` was swallowed; 0 if none."""
    return _received


def _raise_interrupted(signum, frame):
    global _received
    _received = signum
    if _importing(frame):  # an exception inside a native module's import can abort the process
        _resend_later(signum)
        return
    raise Interrupted(signum)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _resend_later(signum: int) -> None:
    """Send `signum` to this process again in a moment, from another thread."""
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def note_signal(signum: int) -> None:
    """Record a signal that the training loop handled itself (see `pending_signal`)."""
    global _received
    _received = signum


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (main thread only). Where it cannot be raised safely (during
    an import, which may be a native module's; in a gc callback or finalizer, which print "Exception
    ignored" instead) the signal is sent again, to be raised a moment later; the flag stays set for the
    training loop either way."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)
    default = sys.unraisablehook
    resent = [0]

    def unraisable(info) -> None:
        if isinstance(info.exc_value, Interrupted):
            if resent[0] < 100:  # not raised inside this hook
                resent[0] += 1
                _resend_later(info.exc_value.signum)
            return
        default(info)

    sys.unraisablehook = unraisable


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
