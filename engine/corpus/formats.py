"""Record formats: recognise each record by its fields and normalise it into an `Example`.

Detected per record, so a file may mix formats (the stats count each). The fields decide, in this order:

| format              | fields                                              | becomes                         |
|---------------------|-----------------------------------------------------|---------------------------------|
| `input_ids`         | `input_ids` (+ optional `labels`)                   | tokens used exactly as given    |
| `openai`            | `messages: [{role, content}]` (developer = system)  | chat                            |
| `sharegpt`          | `conversations: [{from, value}]` human/gpt/system   | chat                            |
| `alpaca`            | `instruction`, `output` (+ `input`, `system`)       | chat: system?, user, assistant  |
| `prompt_completion` | `prompt`, `completion` (strings, or message lists)  | prompt + completion (or chat)   |
| `text`              | `text`                                              | raw text                        |

An alpaca user turn is the instruction, then a blank line and the input when there is one.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.backends.base import IGNORE_LABEL

FORMATS = ("input_ids", "openai", "sharegpt", "alpaca", "prompt_completion", "text")
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


class RecordError(ValueError):
    """This record cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Example:
    """One normalised record. `kind` decides rendering: text, completion, chat or tokens."""
    format: str
    kind: str                                        # "text" | "completion" | "chat" | "tokens"
    text: str = ""                                   # text; the prompt of a completion
    completion: str = ""
    messages: tuple[dict, ...] = ()                  # chat: ({"role", "content"}, ...)
    train_from: int = 0                              # chat: only assistant turns at this index or later train
    input_ids: tuple[int, ...] = ()
    labels: tuple[int, ...] | None = None


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, found {type(value).__name__}")
    return value


def _content(value, where: str) -> str:
    """Message content: a string, or OpenAI-style parts of which only text parts are allowed."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            raise RecordError(f"{where}: only text content is supported (found a non-text part)")
        return "".join(p["text"] for p in value)
    raise RecordError(f"{where}: content must be a string, found {type(value).__name__}")


def _messages(items, key: str, role_key: str, text_key: str, role_map: dict) -> tuple[dict, ...]:
    if not isinstance(items, list) or not items:
        raise RecordError(f"field {key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise RecordError(f"{where} must be an object with {role_key!r} and {text_key!r}")
        role = m[role_key]
        if not isinstance(role, str):
            raise RecordError(f"{where}: {role_key!r} must be a string")
        mapped = role_map.get(role.lower())
        if mapped is None:
            raise RecordError(f"{where}: unknown {role_key} {role!r}; expected one of {', '.join(role_map)}")
        out.append({"role": mapped, "content": _content(m[text_key], where)})
    return tuple(out)


def _int_list(value, key: str, allow_ignore: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"field {key!r} must be a non-empty list of token ids")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or \
                not (0 <= v < 1 << 31 or (allow_ignore and v == IGNORE_LABEL)):
            raise RecordError(f"field {key!r} holds {v!r}; expected token ids (integers >= 0"
                              f"{f' or {IGNORE_LABEL}' if allow_ignore else ''})")
    return tuple(value)


def detect_format(record) -> str:
    if not isinstance(record, dict):
        found = "a list" if isinstance(record, list) else type(record).__name__
        raise RecordError(f"expected a JSON object, found {found}")
    if "chosen" in record or "rejected" in record:   # engine.corpus.pairs reads these
        raise RecordError("a preference pair ('chosen'/'rejected') in a supervised corpus; train it with "
                          "objective dpo or orpo, or give 'messages', 'text' or 'prompt'/'completion' records")
    if "input_ids" in record:
        return "input_ids"
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(map(str, record))[:8]) or "none"
    raise RecordError(f"unknown record format (fields: {keys}); expected text, prompt/completion, "
                      "instruction/input/output, conversations, messages or input_ids")


def to_example(record) -> Example:
    fmt = detect_format(record)
    if fmt == "input_ids":
        ids = _int_list(record["input_ids"], "input_ids", allow_ignore=False)
        labels = None
        if record.get("labels") is not None:
            labels = _int_list(record["labels"], "labels", allow_ignore=True)
            if len(labels) != len(ids):
                raise RecordError(f"'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
        return Example(fmt, "tokens", input_ids=ids, labels=labels)
    if fmt == "openai":
        return Example(fmt, "chat", messages=_messages(record["messages"], "messages", "role", "content",
                                                       OPENAI_ROLES))
    if fmt == "sharegpt":
        return Example(fmt, "chat", messages=_messages(record["conversations"], "conversations", "from", "value",
                                                       SHAREGPT_ROLES))
    if fmt == "alpaca":
        instruction, output = _string(record, "instruction"), _string(record, "output")
        extra = _string(record, "input") if record.get("input") is not None else ""
        system = _string(record, "system") if record.get("system") is not None else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = (({"role": "system", "content": system},) if system.strip() else ()) + (
            {"role": "user", "content": user}, {"role": "assistant", "content": output})
        return Example(fmt, "chat", messages=messages)
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
            head = _messages(prompt, "prompt", "role", "content", OPENAI_ROLES)
            tail = _messages(completion, "completion", "role", "content", OPENAI_ROLES)
            return Example(fmt, "chat", messages=head + tail, train_from=len(head))
        prompt, completion = _string(record, "prompt"), _string(record, "completion")
        if not completion:
            raise RecordError("empty 'completion': nothing to train on")
        return Example(fmt, "completion", text=prompt, completion=completion)
    text = _string(record, "text")
    if not text.strip():
        raise RecordError("empty 'text'")
    return Example(fmt, "text", text=text)
