"""Let widget clicks through while a cell runs, in the main thread (no threads, no Gradio).

A widget event (a Stop click) reaches the kernel as a ``comm_msg`` on the shell channel. The kernel
reads that channel only between cells, so a training loop would see the click after it finished.
:class:`KernelPump` reads the pending shell messages itself, as ``jupyter-ui-poll`` does:

- ``comm_msg`` messages are handed to the kernel's comm handler now (the click runs its callback);
- every other message (a queued cell, a completion request, ...) is given back to the kernel's own
  receive callback unchanged, which queues it exactly as if it had just arrived, so it runs after
  the current cell, in order.

ipykernel 7 (subshells: the main shell's inproc socket), 6 (``shell_stream``) and 5 (``shell_streams``)
are handled. Outside a kernel, off the main thread, or if anything unexpected happens, it does
nothing (and stays off): a training run must never fail because of its progress display.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
COMM_TYPES = ("comm_msg",)


def current_kernel() -> Any | None:
    """The running IPython kernel when called from its main thread, else None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or getattr(kernel, "session", None) is None or not hasattr(kernel, "shell_handlers"):
        return None
    return kernel


def main_shell_stream(kernel) -> Any | None:
    """The ZMQStream the main thread reads shell messages from (ipykernel 7, 6 or 5)."""
    thread = getattr(kernel, "shell_channel_thread", None)
    if thread is not None:  # ipykernel 7 with subshells: the shell channel thread forwards to an inproc pair
        return thread.manager.get_shell_channel_to_subshell_pair(None).to_stream
    stream = getattr(kernel, "shell_stream", None)
    if stream is None:
        streams = getattr(kernel, "shell_streams", None) or [None]
        stream = streams[0]
    return stream


class KernelPump:
    """Call it often (``pump()``); it handles pending widget messages at most every ``interval`` s."""

    def __init__(self, interval: float = 0.5, max_messages: int = 50) -> None:
        self.interval = interval
        self.max_messages = max_messages
        self.kernel = current_kernel()
        self._last = 0.0
        self.handled = 0  # comm messages handled so far
        self.deferred = 0  # other messages given back to the kernel
        self._tasks: set = set()  # asyncio keeps only weak references to tasks

    @property
    def active(self) -> bool:
        return self.kernel is not None

    def __call__(self, force: bool = False) -> int:
        """Handle pending messages; returns how many were read (0 when throttled or outside a kernel)."""
        if self.kernel is None:
            return 0
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return 0
        self._last = now
        try:
            return self._pump()
        except Exception:  # never break training for a display feature
            log.warning("nbkit: widget events cannot be handled during this run", exc_info=True)
            self.kernel = None
            return 0

    def _pump(self) -> int:
        import zmq

        stream = main_shell_stream(self.kernel)
        callback = getattr(stream, "_recv_callback", None)
        if stream is None or callback is None or stream.closed():
            self.kernel = None
            return 0
        socket, copy = stream.socket, getattr(stream, "_recv_copy", False)
        others, count = [], 0
        while count < self.max_messages and socket.poll(0, zmq.POLLIN):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                break
            count += 1
            if not self._handle_comm(stream, frames, copy):
                others.append(frames)
        for frames in others:  # back to the kernel's queue, in arrival order
            self._schedule(callback(frames))
            self.deferred += 1
        return count

    def _schedule(self, result) -> None:
        """Run a coroutine result on the kernel's loop once the cell returns (as ZMQStream does)."""
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _handle_comm(self, stream, frames, copy: bool) -> bool:
        """Run a ``comm_msg`` now and return True; False for any other message (the caller gives it back)."""
        kernel = self.kernel
        session = kernel.session
        idents, parts = session.feed_identities(frames, copy=copy)
        # Header only (no signature bookkeeping), so a message given back deserializes normally.
        header = session.deserialize(parts, content=False, copy=copy)["header"]
        if header.get("msg_type") not in COMM_TYPES:
            return False
        msg = session.deserialize(parts, content=True, copy=copy)
        handler = kernel.shell_handlers.get(msg["header"]["msg_type"])
        if handler is None:
            return True
        _publish_status(kernel, "busy", msg)
        try:
            self._schedule(handler(stream, idents, msg))  # comm_manager.comm_msg: the widget's callbacks run here
        finally:
            # The frontend holds a widget's next update until this idle; then "busy" again for the
            # running cell, so the kernel indicator does not show idle while training goes on.
            _publish_status(kernel, "idle", msg)
            _publish_status(kernel, "busy", _cell_parent(kernel))
        self.handled += 1
        return True


def _cell_parent(kernel) -> dict:
    try:
        return kernel.get_parent("shell")  # ipykernel >= 6
    except (AttributeError, TypeError):
        return getattr(kernel, "_parent_header", {})


def _publish_status(kernel, status: str, parent: dict) -> None:
    try:
        kernel._publish_status(status, "shell", parent)  # ipykernel >= 6
    except TypeError:
        kernel._publish_status(status, parent)  # ipykernel 5
