"""Preference pairs: recognise each record's pair format, normalise it into two `Example`s (chosen, rejected) that
share their prompt, and tokenize the pair with the prompt checked to be identical token by token.

Detected per record, like the SFT formats (formats.py); a record holding `chosen` or `rejected` is a pair:

| format           | fields                                                     | becomes                         |
|------------------|------------------------------------------------------------|---------------------------------|
| `pair_sharegpt`  | `conversations` + `chosen`/`rejected` message objects      | chat (LLaMA-Factory ranking)    |
| `pair_alpaca`    | `instruction` (+ `input`, `system`) + `chosen`/`rejected`  | chat (LLaMA-Factory ranking)    |
| `pair_explicit`  | `prompt`, `chosen`, `rejected`: strings, or message lists  | completion, or chat (TRL)       |
| `pair_implicit`  | `chosen`, `rejected`: full conversations (or strings) that | the shared prefix is the prompt |
|                  | share their prefix                                         | (TRL's extract_prompt)          |

String pairs render as SFT's prompt/completion does ([BOS] prompt completion EOS, TRL's standard format); message
pairs through the model's chat template with only the turns after the prompt trained. Either way the tokens
before the first trained one (the prompt, as the template rendered it) must be the same ids in chosen and
rejected: a pair whose template rewrites the prompt depending on the answer is refused, since DPO and ORPO
compare the two answers to one prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.backends.base import IGNORE_LABEL
from engine.corpus.formats import OPENAI_ROLES, SHAREGPT_ROLES, Example, RecordError, _messages, _string

PAIR_FORMATS = ("pair_sharegpt", "pair_alpaca", "pair_explicit", "pair_implicit")


@dataclass(frozen=True)
class PairExample:
    format: str
    chosen: Example
    rejected: Example


def is_pair(record) -> bool:
    return isinstance(record, dict) and ("chosen" in record or "rejected" in record)


def detect_pair_format(record: dict) -> str:
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError(f"a preference pair needs both 'chosen' and 'rejected'; {key!r} is missing")
    if "conversations" in record:
        return "pair_sharegpt"
    if "instruction" in record:
        return "pair_alpaca"
    if "prompt" in record:
        return "pair_explicit"
    return "pair_implicit"


def _one_message(value, key: str, role_key: str, text_key: str, roles: dict) -> tuple[dict, ...]:
    """LLaMA-Factory's ranking answers are one message object; accept a one-element list too."""
    items = value if isinstance(value, list) else [value]
    out = _messages(items, key, role_key, text_key, roles)
    if any(m["role"] != "assistant" for m in out):
        raise RecordError(f"field {key!r} must hold the assistant's answer, found role {out[0]['role']!r}")
    return out


def _chat_pair(fmt: str, prompt: tuple[dict, ...], chosen: tuple[dict, ...], rejected: tuple[dict, ...]
               ) -> PairExample:
    if not prompt or prompt[-1]["role"] == "assistant":
        raise RecordError("the prompt must end with a user (or tool) turn, so the answers that follow it are the "
                          "assistant's")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical: a pair must differ to say which is better")
    return PairExample(fmt, Example(fmt, "chat", messages=prompt + chosen, train_from=len(prompt)),
                       Example(fmt, "chat", messages=prompt + rejected, train_from=len(prompt)))


def _text_pair(fmt: str, prompt: str, chosen: str, rejected: str) -> PairExample:
    if not chosen or not rejected:
        raise RecordError(f"empty {'chosen' if not chosen else 'rejected'!r}: nothing to compare")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical: a pair must differ to say which is better")
    return PairExample(fmt, Example(fmt, "completion", text=prompt, completion=chosen),
                       Example(fmt, "completion", text=prompt, completion=rejected))


def _common_text_prefix(a: str, b: str) -> str:
    """TRL's extract_prompt on strings: the common prefix, ending before the space at which the answers part."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if 0 < n < min(len(a), len(b)) and a[n - 1] == " ":
        n -= 1
    return a[:n]


def to_pair(record) -> PairExample:
    fmt = detect_pair_format(record)
    chosen, rejected = record["chosen"], record["rejected"]
    if fmt == "pair_sharegpt":
        prompt = _messages(record["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
        if isinstance(record.get("system"), str) and record["system"].strip():
            prompt = ({"role": "system", "content": record["system"]},) + prompt
        return _chat_pair(fmt, prompt, _one_message(chosen, "chosen", "from", "value", SHAREGPT_ROLES),
                          _one_message(rejected, "rejected", "from", "value", SHAREGPT_ROLES))
    if fmt == "pair_alpaca":
        instruction = _string(record, "instruction")
        extra = _string(record, "input") if record.get("input") is not None else ""
        system = _string(record, "system") if record.get("system") is not None else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        prompt = (({"role": "system", "content": system},) if system.strip() else ()) + (
            {"role": "user", "content": user},)
        answers = [({"role": "assistant", "content": _string(record, k)},) for k in ("chosen", "rejected")]
        return _chat_pair(fmt, prompt, *answers)
    if fmt == "pair_explicit":
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return _chat_pair(fmt, _messages(prompt, "prompt", "role", "content", OPENAI_ROLES),
                              _one_message(chosen, "chosen", "role", "content", OPENAI_ROLES),
                              _one_message(rejected, "rejected", "role", "content", OPENAI_ROLES))
        return _text_pair(fmt, _string(record, "prompt"), _string(record, "chosen"), _string(record, "rejected"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _common_text_prefix(chosen, rejected)
        return _text_pair(fmt, prompt, chosen[len(prompt):], rejected[len(prompt):])
    c = _messages(chosen, "chosen", "role", "content", OPENAI_ROLES)
    r = _messages(rejected, "rejected", "role", "content", OPENAI_ROLES)
    shared = 0
    while shared < min(len(c), len(r)) and c[shared] == r[shared]:
        shared += 1
    if shared == 0:
        raise RecordError("'chosen' and 'rejected' share no leading message, so there is no prompt; give an "
                          "explicit 'prompt'")
    if shared == len(c) and shared == len(r):
        raise RecordError("'chosen' and 'rejected' are identical: a pair must differ to say which is better")
    if c[shared - 1]["role"] == "assistant":   # the answers part inside an assistant turn: it is not the prompt
        shared -= 1
    for key, messages in (("chosen", c), ("rejected", r)):
        if shared == len(messages) or messages[shared]["role"] != "assistant":
            raise RecordError(f"'{key}' must continue the shared prompt with an assistant turn (after message "
                              f"{shared})")
    return _chat_pair(fmt, c[:shared], c[shared:], r[shared:])


def prompt_length(labels: np.ndarray) -> int:
    """Tokens before the first trained one: the prompt as the model sees it."""
    trained = np.flatnonzero(labels != IGNORE_LABEL)
    return int(trained[0]) if trained.size else len(labels)


def check_shared_prompt(chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]) -> int:
    """The prompt's token count, after checking both rows open with the same prompt ids; RecordError otherwise."""
    (c_ids, c_labels), (r_ids, r_labels) = chosen, rejected
    pc, pr = prompt_length(c_labels), prompt_length(r_labels)
    same = min(pc, pr)
    differ = np.flatnonzero(c_ids[:same] != r_ids[:same])
    if pc != pr or differ.size:
        at = int(differ[0]) if differ.size else same
        raise RecordError(f"the prompt renders differently before chosen ({pc} tokens) and rejected ({pr} tokens); "
                          f"first difference at token {at}: the chat template rewrites the prompt depending on the "
                          "answer, so the two answers would not be compared to one prompt")
    if pc == len(c_labels) or pr == len(r_labels):
        raise RecordError("nothing to train on: chosen or rejected has no completion token")
    return pc
