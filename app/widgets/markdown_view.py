"""A read-only view that renders model output as Markdown, safely.

Model text is untrusted: raw HTML in it is shown as text (MarkdownNoHTML), links are not followed, and no
resource (an image naming a local file or a URL) is ever loaded.
"""
from __future__ import annotations

from PySide6.QtGui import QTextDocument
from PySide6.QtWidgets import QTextBrowser

MARKDOWN = QTextDocument.MarkdownFeature.MarkdownDialectGitHub | QTextDocument.MarkdownFeature.MarkdownNoHTML


class MarkdownView(QTextBrowser):
    def __init__(self, parent=None, **kwargs):
        super().__init__(parent, **kwargs)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)

    def show_markdown(self, text: str) -> None:
        bar = self.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        self.document().setMarkdown(text, MARKDOWN)
        if at_end:
            bar.setValue(bar.maximum())

    def loadResource(self, kind, url):   # noqa: N802 (Qt override)
        return None
