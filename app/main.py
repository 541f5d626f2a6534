"""`lora-lab-gui` / `python -m app`: open the main window, optionally on a model.

The application runs under qasync, so Qt's event loop is also the asyncio loop: a coroutine can be awaited from
the window without a second loop in the GUI thread. The training run does not use it: TrainingController runs the
engine's handover on its own asyncio loop in a worker thread, so the window only ever receives signals.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-lab-gui")
    parser.add_argument("--model", help="model folder, .gguf file, hub id or 'demo'")
    args = parser.parse_args(argv)
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    os.makedirs(os.environ["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)

    import asyncio

    import qasync
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow
    from app.workers import wait_for_workers

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("LoRA-Lab")
    app.setApplicationName("LoRA-Lab")
    app.setDesktopFileName("lora-lab")
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    model = args.model or QSettings().value("model/last") or None
    window = MainWindow(model)
    window.show()
    closed = asyncio.Event()
    app.aboutToQuit.connect(closed.set)
    with loop:
        loop.run_until_complete(closed.wait())
    wait_for_workers()
    return 0
