"""SIGINT and SIGTERM during a run: caught once, and acted on where stopping is safe.

A run that is told to stop must save where it is and exit with 128 + the signal's number,
however many signals come and whenever they come. So, while :func:`catching_signals` is
active (a command's whole body; ``fit`` on its own when called from a script):

* the **first** SIGINT / SIGTERM is remembered (``stop["signal"]``). Inside
  :func:`signals_deferred` (training, checkpoint saves, the end-of-run report) that is all:
  the code checks ``stop`` where it can stop safely (the training loop after each step, the
  report between its parts). Outside it (loading data) there is nothing to save, and
  :class:`SignalStop` is raised at once;
* **later** signals are ignored: the run is already stopping. (A second Ctrl-C that raised
  KeyboardInterrupt in the middle of a checkpoint save, or in JAX's atexit clean-up, gave
  tracebacks, a lost checkpoint of the step, and on some machines SIGSEGV instead of 130.)

The handler is the state: nested uses find the one installed (``signal.getsignal``), so a
command and the ``fit`` it calls share one first signal. Signal handlers can only be set in
the main thread; elsewhere nothing is installed and ``stop["signal"]`` stays None.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

from jaxcnn.errors import SignalStop

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _Catcher:
    """The SIGINT / SIGTERM handler of a run: see the module's docstring."""

    def __init__(self):
        self.stop: dict = {"signal": None}
        self.deferring = 0

    def __call__(self, signum, frame):
        if self.stop["signal"] is not None:
            return  # already stopping
        self.stop["signal"] = signum
        if not self.deferring:
            raise SignalStop(f"stopped by {signal_name(signum)} (outside training: there was nothing to save)", signum)


def _installed() -> Optional[_Catcher]:
    handlers = {id(signal.getsignal(s)) for s in SIGNALS}
    h = signal.getsignal(SIGNALS[0])
    return h if isinstance(h, _Catcher) and len(handlers) == 1 else None


@contextlib.contextmanager
def catching_signals():
    """SIGINT and SIGTERM caught by one handler (the one already installed, or a new one that is
    removed again on exit); yields its ``_Catcher``."""
    if threading.current_thread() is not threading.main_thread():
        yield _Catcher()
        return
    catcher = _installed()
    if catcher is not None:
        yield catcher
        return
    catcher = _Catcher()
    previous = {s: signal.signal(s, catcher) for s in SIGNALS}
    try:
        yield catcher
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred():
    """Within: the first SIGINT / SIGTERM is only noted in the yielded ``{"signal": None | signum}``
    (later ones are ignored); the caller checks it where it can stop."""
    with catching_signals() as catcher:
        catcher.deferring += 1
        try:
            yield catcher.stop
        finally:
            catcher.deferring -= 1


def ignore_signals() -> None:
    """Ignore SIGINT and SIGTERM from here on (a command's process that is ending: a signal in the
    interpreter's or JAX's shutdown would raise where nothing can handle it)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
