"""The chat, without widgets: one ChatEngine driven from worker threads, histories, compare mode, handover state.

Widgets call the methods here and listen to the signals; every blocking engine call (loading, answering,
adapters) runs in a worker thread, so the window never waits on torch. Tests drive this class directly.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.workers import run_in_thread
from engine.chat.generation import GenerationSettings
from engine.chat.handover import Handover, Transition
from engine.chat.inference import ChatEngine

BASE = "Base"   # what the adapter selector shows for "no adapter"


@dataclass
class Conversation:
    """One column of the chat: the messages so far, the adapter answering (None: the base model)."""

    adapter: str | None
    messages: list[dict] = field(default_factory=list)
    stopped: set[int] = field(default_factory=set)     # indices of answers the user stopped before their end

    def answer_so_far(self) -> str:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


class ChatController(QObject):
    model_ready = Signal(str)              # model reference
    adapters_changed = Signal(list, object)  # names, active name (None: base)
    conversations_changed = Signal()       # messages were added or grew: widgets re-render
    busy_changed = Signal(bool)            # an answer is being generated
    state_changed = Signal(str)            # handover/engine state for the status bar
    error = Signal(str, str)               # message, detail

    def __init__(self, engine: ChatEngine | None = None, parent=None):
        super().__init__(parent)
        self.engine = engine or ChatEngine()
        self.handover = Handover(self.engine)
        # Transitions arrive on whichever thread changed state; a signal carries them to the GUI thread.
        self.handover.listeners.append(self._on_transition)
        self.settings = GenerationSettings()
        self.compare = False
        self.conversations = [Conversation(None)]
        self._cancel: threading.Event | None = None
        self._busy = False

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def adapter_names(self) -> list[str]:
        return list(self.engine.adapters)

    @property
    def active_adapter(self) -> str | None:
        return self.engine.active_adapter

    def _on_transition(self, transition: Transition) -> None:
        self.state_changed.emit(transition.state.value)

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self.busy_changed.emit(busy)

    def _fail(self, message: str, detail: str) -> None:
        self.error.emit(message, detail)

    def refresh(self) -> None:
        """Show what the engine holds now (after the handover brought chat back with a new adapter)."""
        self.state_changed.emit(self.handover.state.value if self.engine.loaded else "no model")
        self._publish_adapters()
        self.busy_changed.emit(self._busy)

    def _publish_adapters(self) -> None:
        self._reset_columns()
        self.adapters_changed.emit(self.adapter_names, self.active_adapter)

    # -- model and adapters -----------------------------------------------------------------------------------
    def load_model(self, ref: str) -> None:
        self.state_changed.emit("loading model")

        def done(_):
            self.state_changed.emit(self.handover.state.value)
            self._publish_adapters()
            self.model_ready.emit(ref)

        def failed(message, detail):
            self.state_changed.emit("no model")
            self._fail(message, detail)

        def work():
            self.engine.load(ref)
            # peft's first import takes a few hundred ms of the GIL; doing it now, while the user waits for the
            # model anyway, keeps it out of the reload after training (when the window must stay live).
            import peft  # noqa: F401

        run_in_thread(self, work, on_result=done, on_error=failed)

    def load_adapter(self, path: str | Path, activate: bool = True) -> None:
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            path = path.parent       # a dropped adapter_model.safetensors means its folder
        self.state_changed.emit("loading adapter")

        def work():
            name = self.engine.load_adapter(path)
            if activate:
                self.engine.set_active_adapter(name)
            return name

        def finished(_name):
            self.state_changed.emit(self.handover.state.value)
            self._publish_adapters()

        def failed(message, detail):
            self.state_changed.emit(self.handover.state.value)
            self._fail(message, detail)

        run_in_thread(self, work, on_result=finished, on_error=failed)

    def set_active_adapter(self, name: str | None) -> None:
        try:
            self.engine.set_active_adapter(name)
        except Exception as exc:   # e.g. the model is unloaded for training
            self._fail(str(exc), "")
        self._publish_adapters()

    def set_compare(self, on: bool) -> None:
        self.compare = on
        self._reset_columns()

    def _reset_columns(self) -> None:
        """Columns follow compare mode and the active adapter. A column whose model stays keeps its conversation
        (toggling Compare used to wipe it); a column for another model starts fresh."""
        wanted = [None, self.active_adapter] if self.compare else [self.active_adapter]
        if [c.adapter for c in self.conversations] != wanted:
            kept = {c.adapter: c for c in self.conversations}     # the last column of a model wins
            # Each kept conversation goes to one column only, the last (the adapter's side of a comparison, even
            # when it is the base model too).
            columns = [kept.pop(a, None) or Conversation(a) for a in reversed(wanted)]
            self.conversations = columns[::-1]
            self.conversations_changed.emit()

    # -- answering --------------------------------------------------------------------------------------------
    def send(self, prompt: str) -> None:
        prompt = prompt.strip()
        if not prompt or self._busy:
            return
        for conv in self.conversations:
            conv.messages.append({"role": "user", "content": prompt})
        self._answer()

    def regenerate(self) -> None:
        """Drop the last answers and ask again with the same history."""
        if self._busy:
            return
        for conv in self.conversations:
            if conv.messages and conv.messages[-1]["role"] == "assistant":
                conv.messages.pop()
                conv.stopped.discard(len(conv.messages))
        if self.conversations[0].messages:
            self._answer()

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def clear(self) -> None:
        self.stop()
        for conv in self.conversations:
            conv.messages.clear()
            conv.stopped.clear()
        self.conversations_changed.emit()

    def last_answer(self, column: int = -1) -> str:
        return self.conversations[column].answer_so_far()

    def _answer(self) -> None:
        cancel = threading.Event()
        self._cancel = cancel
        convs = list(self.conversations)   # pieces go to these even if compare mode changes meanwhile
        jobs = [(i, conv.adapter, list(conv.messages)) for i, conv in enumerate(convs)]
        for conv in convs:
            conv.messages.append({"role": "assistant", "content": ""})
        self._set_busy(True)
        self.conversations_changed.emit()
        settings = self.settings

        def work(progress):
            if len(jobs) == 1:
                _, adapter, messages = jobs[0]
                for piece in self.engine.stream_chat(messages, settings, cancel, adapter=adapter):
                    progress((0, piece))
                return
            # Compare mode: one batch answers every column, so the answers grow together, token by token.
            stream = self.engine.stream_side_by_side([(messages, adapter) for _, adapter, messages in jobs],
                                                     settings, cancel)
            for column, piece in stream:
                progress((column, piece))

        def on_piece(item):
            column, piece = item
            messages = convs[column].messages
            if messages and messages[-1]["role"] == "assistant":   # not cleared meanwhile
                messages[-1]["content"] += piece
                self.conversations_changed.emit()

        def finished():
            if cancel.is_set():       # stopped by the user: the answers in flight (or not begun) say so
                for conv in convs:
                    if conv.messages and conv.messages[-1]["role"] == "assistant":
                        conv.stopped.add(len(conv.messages) - 1)
                self.conversations_changed.emit()
            self._cancel = None
            self._set_busy(False)

        run_in_thread(self, work, on_progress=on_piece, on_error=self._fail, on_done=finished)
