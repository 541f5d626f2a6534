"""Run blocking engine calls off the GUI thread. Workers never touch widgets: results come back as signals.

`run_in_thread(parent, fn, *args)` runs fn in a fresh QThread; `finished(result)` or `errored(message, detail)`
is emitted in the GUI thread, then `done()` always.
"""
from __future__ import annotations

import gc
import traceback

from PySide6.QtCore import QCoreApplication, QObject, Qt, QThread, QTimer, Signal, Slot


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


class _Relay(QObject):
    """Lives in the caller's (GUI) thread, so the worker's signals reach the callbacks there, queued.

    A plain function connected straight to a worker signal would run in the worker's thread (PySide uses the
    sender as context when the slot has no QObject), where touching a widget is not allowed.
    """

    def __init__(self, on_result, on_error, on_progress, on_done):
        super().__init__()
        self._callbacks = (on_result, on_error, on_progress, on_done)

    @Slot(object)
    def result(self, value):
        if self._callbacks[0] is not None:
            self._callbacks[0](value)

    @Slot(str, str)
    def error(self, message, detail):
        if self._callbacks[1] is not None:
            self._callbacks[1](message, detail)

    @Slot(object)
    def progress(self, value):
        if self._callbacks[2] is not None:
            self._callbacks[2](value)

    @Slot()
    def done(self):
        if self._callbacks[3] is not None:
            self._callbacks[3]()
        self._callbacks = (None, None, None, None)   # let go of closures (and what they reference)
        self.deleteLater()


class GuiThreadCollector(QObject):
    """Python's cyclic garbage collector, run only in the GUI thread.

    Automatic collection runs in whichever thread happens to allocate, and a cycle holding a Qt widget (a dialog
    whose lambda slot refers to it, say) destroyed from a worker thread crashes the process. So automatic
    collection is switched off and this timer collects, generation by generation, as CPython would, but here.
    """

    INTERVAL_MS = 500

    def __init__(self):
        super().__init__()
        self.thresholds = gc.get_threshold()
        gc.disable()
        gc.freeze()   # what exists now (imported modules) is never garbage: keeps full collections short
        self.timer = QTimer(self, interval=self.INTERVAL_MS)
        self.timer.timeout.connect(self.check)
        self.timer.start()

    @Slot()
    def check(self) -> None:
        count0, count1, count2 = gc.get_count()
        if count0 > self.thresholds[0]:
            gc.collect(0)
            if count1 > self.thresholds[1]:
                gc.collect(1)
                if count2 > self.thresholds[2]:
                    gc.collect(2)


_collector: GuiThreadCollector | None = None


def collect_garbage_in_gui_thread() -> None:
    """Install the GuiThreadCollector once, from the GUI thread, before any worker starts."""
    global _collector
    app = QCoreApplication.instance()
    if _collector is None and app is not None and QThread.currentThread() == app.thread():
        _collector = GuiThreadCollector()


def stop_collecting_in_gui_thread() -> None:
    """Back to CPython's automatic collection (after a final collection here); for tests that end a window."""
    global _collector
    if _collector is not None:
        _collector.timer.stop()
        _collector.deleteLater()
        _collector = None
        gc.unfreeze()
        gc.enable()
    gc.collect()


def run_in_thread(parent: QObject | None, fn, *args, on_result=None, on_error=None, on_progress=None,
                  on_done=None, **kwargs) -> Worker:
    """Run fn(*args, **kwargs) in a new thread; `parent` only documents who asked.

    Callbacks run in the calling thread (the GUI thread): on_result(value) or on_error(message, detail), then
    on_done(). With `on_progress`, fn also gets `progress=<callable>`; each call reaches on_progress(value).
    """
    collect_garbage_in_gui_thread()
    thread = QThread()
    worker = Worker(fn, *args, **kwargs)
    relay = _Relay(on_result, on_error, on_progress, on_done)
    if on_progress is not None:
        worker._kwargs["progress"] = worker.progress.emit
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    worker.finished.connect(relay.result, Qt.QueuedConnection)
    worker.errored.connect(relay.error, Qt.QueuedConnection)
    worker.progress.connect(relay.progress, Qt.QueuedConnection)
    worker.done.connect(relay.done, Qt.QueuedConnection)
    # Direct: quit() is thread-safe, and a queued call would need the GUI loop, which wait_for_workers blocks.
    worker.done.connect(thread.quit, Qt.DirectConnection)
    thread.finished.connect(lambda: _running.discard(thread))
    thread.finished.connect(thread.deleteLater)
    thread.worker, thread.relay = worker, relay   # kept alive while it runs
    _running.add(thread)
    thread.start()
    return worker
