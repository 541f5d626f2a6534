"""The chat, without widgets: one ChatEngine driven from worker threads, histories, compare mode, handover state.

Widgets call the methods here and listen to the signals; every blocking engine call (loading, answering,
adapters) runs in a worker thread, so the window never waits on torch. Tests drive this class directly.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.workers import run_in_thread
from engine.chat.generation import GenerationSettings
from engine.chat.handover import Handover, Transition
from engine.chat.inference import AdapterError, ChatEngine

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
    notice = Signal(str)                   # something left out on the way (an adapter that does not fit, ...)

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
        self.pending_chat: dict | None = None     # a saved chat (app.session) to restore once its model is loaded

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
    def load_model(self, ref: str, adapters: Sequence[str | Path] = ()) -> None:
        """Load the model `ref` for chat. The adapters loaded before, and `adapters` (folders), come back into
        "Answer with" when they fit the new model; one that does not (made for another base) is left out with a
        notice saying why. The active adapter stays active when it came back."""
        self.state_changed.emit("loading model")
        carried = list(self.engine.adapter_paths.items())     # (name, folder); a name None: the engine names it
        active = self.engine.active_adapter
        for path in map(Path, adapters):
            if path.resolve() not in {p.resolve() for _, p in carried}:
                carried.append((None, path))

        def done(notes):
            self.state_changed.emit(self.handover.state.value)
            for note in notes:
                self.notice.emit(note)
            self._publish_adapters()
            if self.pending_chat is not None:
                saved, self.pending_chat = self.pending_chat, None
                for note in self.restore_chat(saved):
                    self.notice.emit(note)
            self.model_ready.emit(ref)

        def failed(message, detail):
            self.state_changed.emit("no model")
            self._fail(message, detail)

        def work():
            self.engine.load(ref)
            # peft's first import takes a few hundred ms of the GIL; doing it now, while the user waits for the
            # model anyway, keeps it out of the reload after training (when the window must stay live).
            import peft  # noqa: F401

            notes = []
            for name, path in carried:
                try:
                    loaded = self.engine.load_adapter(path, name)
                except AdapterError as exc:
                    notes.append(_left_out(name or path.name, path, ref, exc))
                    continue
                if name is not None and name == active:
                    self.engine.set_active_adapter(loaded)
            return notes

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

    # -- the chat kept across restarts (app.session writes and reads the file) -----------------------------------
    def chat_state(self) -> dict:
        """What a restart restores: the model, compare mode, the active adapter and every column's messages."""
        return {"model": self.engine.model_ref, "compare": self.compare, "active": self.active_adapter,
                "columns": [{"adapter": c.adapter, "messages": list(c.messages), "stopped": sorted(c.stopped)}
                            for c in self.conversations]}

    def restore_chat(self, state: dict) -> list[str]:
        """Bring back a chat_state() (read from disk: checked here); returns notes on what could not come back."""
        try:
            columns = [_column(c) for c in state["columns"]]
            compare, active = bool(state["compare"]), state["active"]
        except (KeyError, TypeError, ValueError) as exc:
            return [f"the last chat could not be restored: {exc}"]
        notes = []
        if active is not None and active not in self.adapter_names:
            notes.append(f"the last chat answered with adapter {active}, which is not loaded now: its answers are "
                         "shown, new ones come from the base model")
            active = None
        self.engine.set_active_adapter(active)
        self.compare = compare
        saved = {c.adapter: c for c in columns}
        wanted = [None, active] if compare else [active]
        # A column whose adapter is gone keeps its messages in the column that takes its place.
        self.conversations = [saved.pop(a, None) or (saved.pop(next(iter(saved))) if saved else Conversation(a))
                              for a in wanted]
        for conv, adapter in zip(self.conversations, wanted):
            conv.adapter = adapter
        self.adapters_changed.emit(self.adapter_names, self.active_adapter)
        self.conversations_changed.emit()
        return notes

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
            if len(jobs) == 1 or not self.engine.side_by_side_supported([adapter for _, adapter, _ in jobs]):
                # One column, or an adapter peft cannot batch with the base (DoRA): one answer after the other.
                for column, adapter, messages in jobs:
                    if cancel.is_set():
                        break
                    for piece in self.engine.stream_chat(messages, settings, cancel, adapter=adapter):
                        progress((column, piece))
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


def _column(data) -> Conversation:
    """One saved column, checked: messages of role user/assistant/system with text content."""
    messages = data["messages"]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages):
        raise ValueError("a column's messages are not a list of {role, content} objects")
    adapter = data["adapter"]
    if adapter is not None and not isinstance(adapter, str):
        raise ValueError(f"a column's adapter must be a name or null, got {adapter!r}")
    stopped = {int(i) for i in data.get("stopped", [])}
    return Conversation(adapter, [{"role": m["role"], "content": m["content"]} for m in messages], stopped)


def _left_out(name: str, path: Path, model_ref: str, error: Exception) -> str:
    """Why an adapter did not come back with the model, in the user's terms."""
    if "does not fit model" in str(error):
        return (f"adapter {name} is left out of 'Answer with': its LoRA weights do not fit the layers of "
                f"{Path(model_ref).name} (it was trained for another base model; {path})")
    return f"adapter {name} is left out of 'Answer with': {error}"
