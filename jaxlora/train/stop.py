"""SIGTERM and SIGINT while the training loop runs: a flag checked between steps (then save and exit).

The loop installs its own handlers, whoever called `train`. Its caller may also hand it a `SignalRecord`,
the place where the caller's handlers wrote a signal that arrived before the loop started: the command
lines pass `jaxlora.cli.signals.RECEIVED`, whose handlers raise an exception that a finalizer or a
callback may have swallowed. Such a signal stops the run at once, with a checkpoint. The record is the
seam between the layers: the loop reads and writes it and never imports the command lines.
"""

import signal
from typing import Protocol


class SignalRecord(Protocol):
    """The last SIGINT/SIGTERM the process got and nobody handled yet; 0 if none."""

    signum: int


class _NoRecord:
    """The record of a caller without handlers of its own: no signal before the loop."""

    def __init__(self):
        self.signum = 0


class StopSignals:
    """Turn SIGTERM/SIGINT into `received`, checked between steps. The signal goes into `record` too, which
    is cleared on exit: the run returns it as `stopped_by`."""

    def __init__(self, record: SignalRecord | None = None):
        self.record = _NoRecord() if record is None else record
        self.received = self.record.signum  # one that arrived earlier and whose exception was swallowed
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        self.received = self.received or self.record.signum
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self.record.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self.record.signum = 0  # handled: the run returns it as `stopped_by`
