"""The corpus being assembled, without widgets: files (dropped, picked, pasted), loading in a worker, results."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from PySide6.QtCore import QObject, QSettings, Signal

from app.workers import run_in_thread
from engine.model.references import data_dir
from engine.corpus import CONTAINERS, CorpusCancelled, CorpusConfig, load_corpus
from engine.corpus.preferences import holds_pairs, load_preferences

RECENT_KEY = "corpus/recent"


def expand_paths(paths) -> list[Path]:
    """Files as given, and every corpus file (by extension) inside given folders, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CONTAINERS)
        elif p.is_file():
            out.append(p)
    return out


def save_pasted(text: str, folder: Path | None = None) -> Path:
    """Write pasted text to a file the corpus can read: JSONL when every line is a JSON object, else text."""
    # The one data folder models, runs and the README use (LORA_LAB_HOME overrides it).
    folder = folder or data_dir() / "pasted"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        is_jsonl = bool(lines) and all(isinstance(json.loads(line), dict) for line in lines)
    except ValueError:
        is_jsonl = False
    path = folder / f"pasted-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}" \
                    f"{'.jsonl' if is_jsonl else '.txt'}"
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path


class CorpusController(QObject):
    files_changed = Signal(list)      # [Path]
    progress = Signal(int)            # percent of bytes read
    loaded = Signal(object)           # engine.corpus.Corpus, or a PreferenceCorpus when the files hold pairs
    failed = Signal(str, str)
    running_changed = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.files: list[Path] = []
        self.corpus = None
        self._cancel = threading.Event()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def add(self, paths) -> None:
        for p in expand_paths(paths):
            if p.resolve() not in {f.resolve() for f in self.files}:
                self.files.append(p)
        self.files_changed.emit(list(self.files))

    def remove(self, path: Path) -> None:
        self.files = [f for f in self.files if f != path]
        self.files_changed.emit(list(self.files))

    def load(self, model_dir: Path, seq_len: int, val_fraction: float) -> None:
        """Read the files with the model's tokenizer in a worker; `cancel()` stops it between chunks. Files of
        preference pairs (engine.corpus.preferences.holds_pairs) are read as pairs, for DPO/ORPO."""
        if self._running or not self.files:
            return
        config = CorpusConfig(seq_len=seq_len, val_fraction=val_fraction)
        self._cancel = cancel = threading.Event()
        self._running = True
        self.running_changed.emit(True)

        def work(progress):
            if holds_pairs(self.files, config):
                # Pairs are few and small next to SFT corpora: read in one go (no progress until the end, no cancel).
                corpus = load_preferences(self.files, Path(model_dir), config)
                progress(100)
                return corpus
            return load_corpus(self.files, Path(model_dir), config,
                               progress=lambda done, total: progress(int(100 * done / max(total, 1))),
                               cancel=cancel.is_set)

        def done():
            if self._running:
                self._running = False
                self.running_changed.emit(False)

        def finished(corpus):
            done()     # not running any more by the time listeners hear about the result
            self.corpus = corpus
            remember_corpora(self.files)
            self.loaded.emit(corpus)

        def errored(message, detail):
            done()
            if message.startswith(CorpusCancelled.__name__):
                message = "corpus loading cancelled"
            self.failed.emit(message, detail)

        run_in_thread(self, work, on_result=finished, on_error=errored, on_progress=self.progress.emit, on_done=done)

    def cancel(self) -> None:
        self._cancel.set()


def remember_corpora(files) -> None:
    recent = [str(f) for f in files] + [r for r in recent_corpora() if r not in {str(f) for f in files}]
    QSettings().setValue(RECENT_KEY, recent[:20])


def recent_corpora() -> list[str]:
    value = QSettings().value(RECENT_KEY) or []
    return [value] if isinstance(value, str) else [str(v) for v in value]
