"""`lora-lab-gui` / `python -m app`: open the main window, optionally on a model."""
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

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.main_window import MainWindow
    from app.workers import wait_for_workers

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("LoRA-Lab")
    app.setApplicationName("LoRA-Lab")
    app.setDesktopFileName("lora-lab")
    model = args.model or QSettings().value("model/last") or None
    window = MainWindow(model)
    window.show()
    code = app.exec()
    wait_for_workers()
    return code
