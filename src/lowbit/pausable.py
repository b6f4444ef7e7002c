"""Calls that pause from inside (a hook) and resume later: one thread per call, one running at a time.

The layer-by-layer pipeline runs a decoder layer over every calibration batch in one pass with
them: each batch's forward pauses where an input group is about to be read, the group is
quantized from every batch's input, and the forwards resume with the quantized linears in place.
A stock model's forward cannot be cut at a module without forking its code; a paused thread keeps
the cut inside the stock code. Control is handed over and waited for, so exactly one of the caller
and the calls runs at any time: the work, its order and its floating-point results are those of
running the pieces in turn on the caller's thread.

Thread-local state does not carry into a call's thread: the function must set what it needs
(`torch.no_grad()`, autocast). torch's intra-op thread count does carry (checked).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Cancelled(BaseException):
    """Raised inside a paused call that is cancelled, so that it unwinds (a BaseException: code
    that catches Exception in between does not swallow it)."""


class PausableCall:
    """`fn()` on its own thread, started by the first `resume()`; inside it, `pause()` hands control
    back to whoever resumed it. `result` is fn's return value once `done`."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self.done = False
        self.result: object = None

    def _main(self) -> None:
        self._go.acquire()
        try:
            if not self._cancelled:
                self.result = self._fn()
        except Cancelled:
            pass
        except BaseException as exc:  # handed to the caller by resume()
            self._error = exc
        finally:
            self.done = True
            self._back.release()

    def resume(self) -> None:
        """Run the call until it pauses or returns; re-raises what it raised."""
        if self.done:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="lowbit-pausable", daemon=True)
            self._thread.start()
        self._go.release()
        self._back.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join()
            raise error
        if self.done:
            self._thread.join()

    def pause(self) -> None:
        """From inside the call: wait until resumed (raises Cancelled if cancelled instead)."""
        self._back.release()
        self._go.acquire()
        if self._cancelled:
            raise Cancelled

    def cancel(self) -> None:
        """End the call where it is paused (it unwinds); a call not started never starts."""
        if self.done:
            return
        self._cancelled = True
        if self._thread is None:
            self.done = True
            return
        self._go.release()
        self._back.acquire()
        self._thread.join()
