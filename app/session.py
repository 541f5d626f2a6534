"""The last chat, kept in the data folder between sessions (the runs list is engine.train.history's).

A missing file is a first start; an unreadable one is a note, never a failure: the app starts with an empty chat.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.model.references import data_dir

CHAT_FILE = "last-chat.json"


def chat_file() -> Path:
    return data_dir() / CHAT_FILE


def save_chat(state: dict, path: Path | None = None) -> None:
    """Write a ChatController.chat_state() (replacing the file at once: a crash never leaves half of it)."""
    path = path or chat_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def load_chat(path: Path | None = None) -> tuple[dict | None, list[str]]:
    """(the saved chat state or None, notes). The state's columns are checked by ChatController.restore_chat."""
    path = path or chat_file()
    if not path.is_file():
        return None, []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, [f"the last chat ({path}) could not be read and starts empty: {exc}"]
    if not isinstance(state, dict) or not isinstance(state.get("columns"), list):
        return None, [(f"the last chat ({path}) could not be read and starts empty: expected an object with a "
                      "'columns' list")]
    return state, []
