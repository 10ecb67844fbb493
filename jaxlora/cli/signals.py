"""SIGINT and SIGTERM in the command lines: `Interrupted` at any moment, and a record of the signal.

`install_interrupt_handlers` makes both signals raise `jaxlora.errors.Interrupted`, which `cli_main` turns
into one line and exit code 130 or 143. Every signal is also written to `RECEIVED`, which the `train`
command hands to `jaxlora.train.train(signals=RECEIVED)`: the training loop takes the signals over while
it runs (it saves a checkpoint first) and starts by reading `RECEIVED`, so a signal whose `Interrupted`
something swallowed (a finalizer, a callback) still stops the run. The loop never imports this module
(it is a layer below): it sees `RECEIVED` only as a `jaxlora.train.stop.SignalRecord`.

Light on purpose: the scripts import it before anything heavy, so a Ctrl-C during the imports is caught.
"""

import os
import signal
import sys
import threading

from jaxlora.errors import Interrupted


class Received:
    """The last SIGINT/SIGTERM this process got and nobody handled yet, 0 if none (a `SignalRecord`)."""

    def __init__(self):
        self.signum = 0


RECEIVED = Received()  # the process's one record, written by the handlers below and by the training loop


def _raise_interrupted(signum, frame):
    RECEIVED.signum = signum
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


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise `Interrupted` (main thread only). Where it cannot be raised safely (during
    an import, which may be a native module's; in a gc callback or finalizer, which print "Exception
    ignored" instead) the signal is sent again, to be raised a moment later; `RECEIVED` keeps it for the
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
