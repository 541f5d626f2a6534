"""Run blocking engine calls off the GUI thread. Workers never touch widgets: results come back as signals.

`run_in_thread(parent, fn, *args)` runs fn in a fresh QThread; `finished(result)` or `errored(message, detail)`
is emitted in the GUI thread, then `done()` always.
"""
from __future__ import annotations

import traceback

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot


class Worker(QObject):
    finished = Signal(object)
    errored = Signal(str, str)     # one-line message for the user, traceback for the log
    progress = Signal(object)
    done = Signal()

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self._fn, self._args, self._kwargs = fn, args, kwargs

    @Slot()
    def run(self) -> None:
        try:
            result = self._fn(*self._args, **self._kwargs)
        except BaseException as exc:  # every failure must reach the window, never only stderr
            self.errored.emit(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            self.finished.emit(result)
        finally:
            self.done.emit()


# Threads outlive the widget that started them (a window may close while a model still loads), so they are
# owned here until they finish, never by a widget whose deletion would destroy a running QThread.
_running: set[QThread] = set()


def wait_for_workers(timeout_ms: int = 30000) -> None:
    """Block until every worker thread has finished (application shutdown, tests)."""
    for thread in list(_running):
        thread.wait(timeout_ms)


def run_in_thread(parent: QObject | None, fn, *args, on_result=None, on_error=None, **kwargs) -> Worker:
    """Run fn(*args, **kwargs) in a new thread; `parent` only documents who asked (callbacks are its slots)."""
    thread = QThread()
    worker = Worker(fn, *args, **kwargs)
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    if on_result is not None:
        worker.finished.connect(on_result)
    if on_error is not None:
        worker.errored.connect(on_error)
    # Direct: quit() is thread-safe, and a queued call would need the GUI loop, which wait_for_workers blocks.
    worker.done.connect(thread.quit, Qt.DirectConnection)
    thread.finished.connect(lambda: _running.discard(thread))
    thread.finished.connect(thread.deleteLater)
    thread.worker = worker   # the thread keeps its worker alive while it runs
    _running.add(thread)
    thread.start()
    return worker
