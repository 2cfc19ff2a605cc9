"""Interruptions that unwind the run, so its scratch schema is always dropped.

- `sigterm_raises()`: SIGTERM becomes a `Terminated` exception (like Ctrl-C's
  KeyboardInterrupt), so every `finally` block runs; a second SIGTERM is ignored while the run
  cleans up.
- `cancel_on_interrupt(using)`: a Python signal handler only runs between bytecodes, so a
  signal that arrives during a long statement (an HNSW build) would wait for it to finish. A
  watcher thread, woken through `signal.set_wakeup_fd`, sends PostgreSQL a cancel request for
  the running statement, and the handler's exception follows at once.
"""
import logging
import signal
import socket
import threading
from contextlib import contextmanager

import psycopg2
from django.db import connections

logger = logging.getLogger(__name__)

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class Terminated(Exception):
    """The process received SIGTERM."""


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises Terminated; the previous handler is restored after."""
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup that follows runs to its end
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cancel_running_statement(wrapper):
    raw = wrapper.connection  # the psycopg2 connection, None before the first query
    if raw is not None and not raw.closed:
        raw.cancel()  # thread-safe; a no-op when no statement is running


def _watch(receiver, wrapper, stop):
    while not stop.is_set():
        try:
            data = receiver.recv(64)
        except OSError:
            return
        if not data:
            return
        if any(signum in INTERRUPTS for signum in data):
            try:
                _cancel_running_statement(wrapper)
            except (psycopg2.Error, OSError):
                logger.exception("could not cancel the running statement")


@contextmanager
def cancel_on_interrupt(using="default"):
    """Within the block, SIGINT/SIGTERM also cancel the statement running on `using`."""
    if not _in_main_thread():
        yield
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    stop = threading.Event()
    try:
        previous_fd = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    except ValueError:
        receiver.close()
        sender.close()
        yield
        return
    # Django's connections are per thread: the watcher is handed this thread's.
    wrapper = connections[using]
    watcher = threading.Thread(target=_watch, args=(receiver, wrapper, stop), name="benchmark-interrupts", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        stop.set()
        sender.close()  # wakes the watcher with EOF
        watcher.join(timeout=5)
        receiver.close()
