"""Rendering examples to text with the model's own chat template, then to token ids and labels (-100 = masked).

How each kind becomes tokens:
- text: [BOS] text EOS, every token trained (raw text has no prompt). Long text is split into windows later.
- completion: [BOS] prompt completion EOS; with prompt masking only completion + EOS are trained.
- chat: the model's chat template (`apply_chat_template`), or `DEFAULT_CHAT_TEMPLATE` when it has none. With
  prompt masking only the assistant turns are trained. Which characters those are is found by rendering prefix
  by prefix: turn i is what `render(messages[:i+1])` adds to `render(messages[:i], add_generation_prompt=True)`,
  so the assistant header is masked and the turn's content, end-of-turn token and what follows it up to the next
  turn are trained (exactly TRL's completion-only masking). Where a template renders a turn differently once
  later turns follow (Qwen3 drops the empty <think></think> of earlier turns), the turn's content and end-of-turn
  text are looked up in the full render; failing that, the template's `{% generation %}` blocks decide, or the
  record is skipped with the reason.
- tokens: `input_ids` and `labels` exactly as given (labels default to input_ids); nothing is added.

Token ids always come from tokenizing the whole rendered text at once, so they are exactly what the model sees
at inference; the labels follow the characters: a token is trained when its first character is (fast tokenizers
give offsets). Slow tokenizers without offsets tokenize piece by piece instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.backends.base import IGNORE_LABEL
from engine.corpus.formats import Example, RecordError


# For tokenizers without a chat template: plain text headers that any vocabulary can spell, and the model's own
# EOS after each assistant turn so a chat fine-tune learns to stop. The one fallback: training renders with it and
# chat prompts with it (chat_template_of), so a template-less base is asked exactly as it was taught.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% else %}{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template_of(tokenizer) -> str:
    """The template a model's chats are rendered with: its own (the default one of several), else ours."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or DEFAULT_CHAT_TEMPLATE


def load_tokenizer(model_dir: str | Path):
    """The model's own tokenizer from a local Hugging Face folder (no network)."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from None


class CorpusTokenizer:
    """The few things the corpus needs from a transformers tokenizer, looked up once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token, so examples cannot be ended or packed; set "
                             "eos_token in the model's tokenizer_config.json")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.chat_template = chat_template_of(tokenizer)
        self.has_own_template = self.chat_template is not DEFAULT_CHAT_TEMPLATE
        self.has_generation_blocks = bool(_GENERATION_BLOCK.search(self.chat_template))
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self.bos_prefix = self._special_prefix()

    def _special_prefix(self) -> tuple[int, ...]:
        """What the tokenizer puts before text by itself (BOS for Llama, nothing for Qwen); we add it to text
        and completion examples, never a suffix, since we append EOS ourselves."""
        plain = self.encode("a")
        full = list(self.tokenizer("a", add_special_tokens=True)["input_ids"])
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                return tuple(full[:k])
        return ()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


@dataclass
class Rendered:
    """An example on its way to tokens: text pieces with trained flags, or ids/labels already made."""
    pieces: list[tuple[str, bool]] | None = None
    prefix: tuple[int, ...] = ()            # masked ids before the text (BOS)
    eos: bool = False                       # append EOS (trained)
    ids: np.ndarray | None = None           # set for tokens / generation-block chats
    labels: np.ndarray | None = None
    splittable: bool = False                # raw text: split into windows rather than truncated


def masks_prompt(example: Example, mask_prompt: bool | None) -> bool:
    """The per-format default: prompts are masked for chat and completion data, never for raw text."""
    return example.kind in ("chat", "completion") and (mask_prompt is None or mask_prompt)


def render(example: Example, tok: CorpusTokenizer, mask_prompt: bool | None) -> Rendered:
    mask = masks_prompt(example, mask_prompt)
    if example.kind == "text":
        return Rendered([(example.text, True)], tok.bos_prefix, eos=True, splittable=True)
    if example.kind == "completion":
        return Rendered([(example.text, not mask), (example.completion, True)], tok.bos_prefix, eos=True)
    if example.kind == "tokens":
        ids = np.asarray(example.input_ids, np.int32)
        if int(ids.max()) >= tok.vocab_size:
            raise RecordError(f"token id {int(ids.max())} is outside the tokenizer's vocabulary "
                              f"(size {tok.vocab_size})")
        labels = ids if example.labels is None else np.asarray(example.labels, np.int32)
        return Rendered(ids=ids, labels=labels)
    return _render_chat(example, tok, mask)


def _render_chat(example: Example, tok: CorpusTokenizer, mask: bool) -> Rendered:
    messages = list(example.messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.train_from]
    if mask and not turns:
        raise RecordError("no assistant turn to train on (prompt masking trains only assistant turns)")
    try:
        full = tok.render(messages)
    except Exception as exc:  # jinja raise_exception / TemplateError: the template refuses this conversation
        raise RecordError(f"the chat template refused this conversation: {exc}") from None
    if not mask:
        return Rendered([(full, True)])
    pieces, pos = [], 0
    try:
        for i in turns:
            start, answer = _locate_answer(tok, messages, i, full, pos)
            pieces += [(full[pos:start], False), (answer, True)]
            pos = start + len(answer)
    except Exception:  # an inconsistent prefix, or a template that cannot render a prefix on its own
        return _render_chat_generation_blocks(messages, tok, example.train_from)
    pieces.append((full[pos:], False))
    return Rendered(pieces)


def _locate_answer(tok: CorpusTokenizer, messages: list[dict], i: int, full: str, pos: int) -> tuple[int, str]:
    """Where assistant turn i's trained text starts in the full render, and that text.

    Usually the prefix render is a prefix of the full render and the answer starts right after it. Some
    templates (Qwen3) render the latest assistant turn differently (an empty <think></think>), so an earlier
    turn looks different once later turns follow; then the answer is the turn's content plus the end-of-turn
    text the template put after it, found in the full render after `pos`."""
    prompt = tok.render(messages[:i], add_generation_prompt=True)
    upto = tok.render(messages[:i + 1])
    if not upto.startswith(prompt):
        raise _Inconsistent
    answer = upto[len(prompt):]
    if full.startswith(upto) and len(prompt) >= pos:
        return len(prompt), answer
    content = messages[i]["content"]
    k = answer.find(content) if content else -1
    while k >= 0:  # the longest tail of the answer that starts with the content and is in the full render
        start = full.find(answer[k:], pos)
        if start >= 0:
            return start, answer[k:]
        k = answer.find(content, k + 1)
    raise _Inconsistent


class _Inconsistent(Exception):
    pass


def _render_chat_generation_blocks(messages, tok: CorpusTokenizer, train_from: int) -> Rendered:
    if not tok.has_generation_blocks or train_from:
        raise RecordError("this model's chat format rewrites earlier turns once later ones follow, so the answers "
                          "to learn cannot be picked out of this multi-turn conversation; split it into one "
                          "conversation per answer, or train on whole conversations (lora-lab train "
                          "--no-mask-prompt) (its chat template has no {% generation %} blocks)")
    try:
        out = tok.tokenizer.apply_chat_template(messages, chat_template=tok.chat_template, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
    except Exception as exc:  # the template refuses this conversation
        raise RecordError(f"the chat template refused this conversation: {exc}") from None
    ids = np.asarray(out["input_ids"], np.int32)
    trained = np.asarray(out["assistant_masks"], bool)
    if not trained.any():
        raise RecordError("the chat template's {% generation %} blocks mark no assistant tokens")
    return Rendered(ids=ids, labels=np.where(trained, ids, IGNORE_LABEL).astype(np.int32))


def tokenize(items: list[Rendered], tok: CorpusTokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) int32 for each rendered item, tokenizing text items in one batch call. When every
    token is trained the labels array is the ids array itself (no copy)."""
    todo = [k for k, r in enumerate(items) if r.ids is None]
    texts = ["".join(t for t, _ in items[k].pieces) for k in todo]
    encoded = {}
    if texts and tok.fast:
        batch = tok.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        encoded = {k: (batch["input_ids"][j], batch["offset_mapping"][j]) for j, k in enumerate(todo)}
    out = []
    for k, r in enumerate(items):
        if r.ids is not None:
            out.append((r.ids, r.labels))
            continue
        if k in encoded:
            ids, offsets = encoded[k]
            ids = np.asarray(ids, np.int32)
            trained = _trained_by_offsets(r.pieces, offsets)
        else:  # slow tokenizer: no offsets, so tokenize each piece on its own
            parts = [(np.asarray(tok.encode(t), np.int32), f) for t, f in r.pieces if t]
            ids = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int32)
            trained = np.concatenate([np.full(len(p), f) for p, f in parts]) if parts else np.zeros(0, bool)
        if r.prefix:
            ids = np.concatenate([np.asarray(r.prefix, np.int32), ids])
            trained = np.concatenate([np.zeros(len(r.prefix), bool), trained])
        if r.eos:
            ids = np.append(ids, np.int32(tok.eos_id))
            trained = np.append(trained, True)
        labels = ids if trained.all() else np.where(trained, ids, IGNORE_LABEL).astype(np.int32)
        out.append((ids, labels))
    return out


def _trained_by_offsets(pieces: list[tuple[str, bool]], offsets) -> np.ndarray:
    if all(f for _, f in pieces):
        return np.ones(len(offsets), bool)
    ends = np.cumsum([len(t) for t, _ in pieces])
    flags = np.array([f for _, f in pieces], bool)
    starts = np.fromiter((o[0] for o in offsets), np.int64, len(offsets))
    # The piece holding a token's first character: the first piece whose end lies beyond it.
    index = np.minimum(np.searchsorted(ends, starts, side="right"), len(pieces) - 1)
    return flags[index]
