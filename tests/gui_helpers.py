"""Shared by the GUI tests: isolated QSettings, and cleanup that keeps Qt objects out of worker threads' hands."""
from __future__ import annotations

import pytest
from PySide6.QtCore import QSettings


def release_gui_objects():
    """Workers end, then garbage (widgets in cycles) is collected here, in the GUI thread, not in a later test's
    worker thread; automatic collection comes back for the tests that follow."""
    from app.workers import stop_collecting_in_gui_thread, wait_for_workers

    wait_for_workers()
    stop_collecting_in_gui_thread()


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, qapp, monkeypatch):
    """QSettings, and the data folder (runs list, last chat, pasted text), of each test's own."""
    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "lora-lab-home"))
    QSettings.setDefaultFormat(QSettings.IniFormat)
    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(tmp_path / "settings"))
    qapp.setOrganizationName("LoRA-Lab-test")
    QSettings().clear()
    yield
    release_gui_objects()
