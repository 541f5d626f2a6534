"""The GUI awaits the handover on qasync's Qt event loop: Qt keeps running while training blocks its thread."""
from __future__ import annotations

import threading
import time

import pytest

from engine.chat.handover import Handover, HandoverState
from engine.chat.inference import ChatEngine, TrainingInProgress

pytestmark = pytest.mark.gui


def test_handover_on_the_qt_event_loop(qapp, tiny_llama_dir):
    import qasync
    from PySide6.QtCore import QTimer

    chat = ChatEngine(device="cpu")
    chat.load(tiny_llama_dir)
    handover = Handover(chat)
    ticks, states = [], []
    handover.listeners.append(lambda t: states.append(t.state))
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(handover.state))
    timer.start(10)
    training_thread = []

    def run():
        training_thread.append(threading.current_thread())
        with pytest.raises(TrainingInProgress):
            chat.stream_chat([{"role": "user", "content": "hi"}])
        time.sleep(0.3)  # a blocking training step; the Qt loop must keep ticking meanwhile

    loop = qasync.QEventLoop(qapp)
    try:
        loop.run_until_complete(handover.train(run))
    finally:
        timer.stop()
        loop.close()
    assert training_thread[0] is not threading.main_thread()
    assert ticks.count(HandoverState.TRAINING) >= 5, ticks
    assert states == [HandoverState.UNLOADING, HandoverState.TRAINING, HandoverState.RELOADING, HandoverState.IDLE]
    assert chat.loaded
    handover.close()
    chat.unload()
