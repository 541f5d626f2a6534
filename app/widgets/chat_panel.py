"""The chat panel: adapter selector, Compare, one Markdown column per answering model, prompt and actions.

It only shows what the ChatController holds and forwards clicks to it.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QGuiApplication, QKeySequence, QShortcut
from PySide6.QtWidgets import (QCheckBox, QComboBox, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QSplitter,
                               QVBoxLayout, QWidget)

from app.chat_controller import BASE, ChatController, Conversation
from app.widgets.generation_settings import GenerationSettingsBox
from app.widgets.markdown_view import MarkdownView


def conversation_markdown(conv: Conversation, busy: bool) -> str:
    """The conversation as one Markdown document (speaker headings, then each message as written)."""
    who = conv.adapter or "base model"
    parts = []
    for index, message in enumerate(conv.messages):
        speaker = "You" if message["role"] == "user" else who
        if index in conv.stopped:
            text = (message["content"] + " *(stopped)*") if message["content"] else "*(stopped)*"
        else:
            text = message["content"] or ("…" if busy else "*(empty answer)*")
        parts.append(f"**{speaker}:**\n\n{text}")
    return "\n\n---\n\n".join(parts)


class AdapterSelector(QComboBox):
    """Base or one of the loaded adapters."""

    def __init__(self, parent=None):
        super().__init__(parent, objectName="adapter-selector")
        self.setToolTip("Answer with the base model alone or with a loaded LoRA adapter")
        self.set_adapters([], None)

    def set_adapters(self, names: list[str], active: str | None) -> None:
        self.blockSignals(True)
        self.clear()
        self.addItem(BASE, None)
        for name in names:
            self.addItem(name, name)
        self.setCurrentIndex(0 if active is None else names.index(active) + 1)
        self.blockSignals(False)

    def selected(self) -> str | None:
        return self.currentData()


class ChatPanel(QWidget):
    def __init__(self, controller: ChatController, parent=None):
        super().__init__(parent)
        self.controller = controller
        self._build_widgets()
        self._build_layout()
        # Streaming sends a signal per token; re-rendering Markdown at most every 50 ms keeps the UI light.
        self._render_timer = QTimer(self, singleShot=True, interval=50)
        self._render_timer.timeout.connect(self._render)
        self._connect()
        self._on_busy(False)
        self._render()

    def _build_widgets(self) -> None:
        self.adapter = AdapterSelector()
        self.compare = QCheckBox("Compare with base", objectName="compare")
        self.compare.setToolTip("Answer each prompt twice, side by side: the base model and the selected adapter")
        self.columns = QSplitter(Qt.Horizontal)
        self.views: list[MarkdownView] = []      # one per conversation column, made by _render as needed
        self.prompt = QPlainTextEdit(objectName="prompt", placeholderText="Ask something… (Ctrl+Enter sends)")
        self.prompt.setMaximumHeight(90)
        self.send = QPushButton("Send", objectName="send")
        self.stop = QPushButton("Stop", objectName="stop")
        self.regenerate = QPushButton("Regenerate", objectName="regenerate")
        self.copy = QPushButton("Copy", objectName="copy")
        self.copy.setToolTip("Copy the last answer")
        self.clear = QPushButton("Clear", objectName="clear")
        self.generation = GenerationSettingsBox()

    def _build_layout(self) -> None:
        """Selector row, answer columns, prompt and buttons on the left; generation settings on the right."""
        top = QHBoxLayout()
        top.addWidget(QLabel("Answer with:"))
        top.addWidget(self.adapter, 1)
        top.addWidget(self.compare)
        buttons = QHBoxLayout()
        for b in (self.send, self.stop, self.regenerate, self.copy, self.clear):
            buttons.addWidget(b)
        buttons.addStretch(1)
        left = QVBoxLayout()
        left.addLayout(top)
        left.addWidget(self.columns, 1)
        left.addWidget(self.prompt)
        left.addLayout(buttons)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        side = QVBoxLayout()
        side.addWidget(self.generation)
        side.addStretch(1)
        layout.addLayout(side)

    def _connect(self) -> None:
        controller = self.controller
        self.adapter.currentIndexChanged.connect(lambda _: controller.set_active_adapter(self.adapter.selected()))
        self.compare.toggled.connect(controller.set_compare)
        self.send.clicked.connect(self._send)
        QShortcut(QKeySequence("Ctrl+Return"), self.prompt, self._send)
        self.stop.clicked.connect(controller.stop)
        self.regenerate.clicked.connect(controller.regenerate)
        self.copy.clicked.connect(self._copy)
        self.clear.clicked.connect(controller.clear)
        self.generation.changed.connect(lambda s: setattr(controller, "settings", s))
        controller.adapters_changed.connect(self.adapter.set_adapters)
        controller.conversations_changed.connect(self._render_timer.start)
        controller.busy_changed.connect(self._on_busy)
        controller.model_ready.connect(lambda _: self._on_busy(controller.busy))
        # While training holds the device the chat model is unloaded: Send stays disabled until it is back.
        controller.state_changed.connect(lambda _: self._on_busy(controller.busy))

    def _send(self) -> None:
        text = self.prompt.toPlainText()
        if text.strip() and not self.controller.busy:
            self.prompt.clear()
            self.controller.send(text)

    def _copy(self) -> None:
        QGuiApplication.clipboard().setText(self.controller.last_answer())

    def _on_busy(self, busy: bool) -> None:
        ready = self.controller.engine.loaded
        self.send.setEnabled(ready and not busy)
        self.regenerate.setEnabled(ready and not busy)
        self.stop.setEnabled(busy)
        self.adapter.setEnabled(not busy)
        self.compare.setEnabled(not busy)
        self._render_timer.start()

    def _render(self) -> None:
        convs = self.controller.conversations
        while len(self.views) < len(convs):
            view = MarkdownView(objectName=f"chat-view-{len(self.views)}")
            self.views.append(view)
            self.columns.addWidget(view)
        for i, view in enumerate(self.views):
            view.setVisible(i < len(convs))
            if i < len(convs):
                view.show_markdown(conversation_markdown(convs[i], self.controller.busy))
