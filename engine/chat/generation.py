"""Generation settings and the streaming machinery of one chat answer (no Qt, no model loading).

`ChatStream` runs `model.generate` in its own thread and hands the answer over piece by piece. A stop ends
the iteration within one poll interval (10 ms), whatever the model's speed; generation itself ends through a
StoppingCriteria that `generate` checks after every token, so it lets go of the model once the forward pass in
flight is done. `cancel()` (what unloading uses) waits for that too.
"""
from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class GenerationSettings:
    """How one answer is sampled. temperature 0 means greedy decoding (top_p / top_k then do not apply)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50  # 0 disables top-k filtering
    repetition_penalty: float = 1.1  # 1.0 disables it
    seed: int | None = None  # None: a fresh random answer every time

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"generation setting {name}={value!r} is invalid: {rule}")

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 1 <= self.max_new_tokens <= 32768:
            bad("max_new_tokens", self.max_new_tokens, "use a whole number from 1 to 32768")
        if not number(self.temperature) or not 0.0 <= self.temperature <= 10.0:
            bad("temperature", self.temperature, "use a number from 0 (greedy) to 10")
        if not number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "use a number above 0 and at most 1 (1 disables it)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "use a whole number >= 0 (0 disables it)")
        if not number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", self.repetition_penalty, "use a number above 0 and at most 10 (1 disables it)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            bad("seed", self.seed, "use None or a whole number from 0 to 2**63 - 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate` (the sampling knobs only apply when sampling)."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=float(self.repetition_penalty),
                      do_sample=not self.greedy)
        if self.greedy:
            # Explicitly neutral, so a model's generation_config.json cannot sneak sampling knobs back in.
            # (top_k=None rather than 0: greedy search rejects a top_k it would ignore.)
            kwargs.update(temperature=1.0, top_p=1.0, top_k=None)
        else:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k)
        return kwargs


class _CancelCriteria(StoppingCriteria):
    """Ends generation after the current token when either event is set (the caller's stop or our abort)."""

    def __init__(self, *events: threading.Event):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _PieceStreamer(BaseStreamer):
    """Receives token ids from `generate` and queues the new text each token adds.

    Text is decoded from the ids of the current line (so a tokenizer that merges bytes across tokens still
    decodes correctly) and held back while it ends in an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer, out: queue.Queue):
        self.tokenizer = tokenizer
        self.out = out
        self.prompt_pending = True  # generate() first puts the whole prompt; it is not part of the answer
        self.line_ids: list[int] = []
        self.emitted = 0  # characters of the current line already queued
        self.tokens = 0

    def put(self, value: torch.Tensor):
        if self.prompt_pending:
            self.prompt_pending = False
            return
        ids = value.reshape(-1).tolist()
        self.tokens += len(ids)
        self.line_ids.extend(ids)
        self._flush(final=False)

    def end(self):
        self._flush(final=True)

    def _flush(self, final: bool):
        text = self.tokenizer.decode(self.line_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.emitted:
            self.out.put(text[self.emitted:])
        self.emitted = len(text)
        if text.endswith("\n") or final:
            self.line_ids, self.emitted = [], 0


class _RowQueue:
    """What one row's _PieceStreamer writes to: its pieces go to the shared queue as (row, text)."""

    def __init__(self, out: queue.Queue, row: int):
        self.out, self.row = out, row

    def put(self, text: str):
        self.out.put((self.row, text))


class _RowsStreamer(BaseStreamer):
    """Receives the token ids of a batch of answers (one row each) and queues (row, text) as each row grows.

    Every generation step brings one token per row, so the rows' pieces arrive interleaved. A row that produced an
    end-of-sequence token is finished: the padding `generate` appends to it afterwards is not part of its answer.
    """

    def __init__(self, tokenizer, out: queue.Queue, rows: int, eos_ids: set[int]):
        self.rows = [_PieceStreamer(tokenizer, _RowQueue(out, r)) for r in range(rows)]
        for row in self.rows:
            row.prompt_pending = False
        self.eos_ids = eos_ids
        self.prompt_pending = True
        self.finished = [False] * rows

    @property
    def tokens(self) -> int:
        return sum(row.tokens for row in self.rows)

    def put(self, value: torch.Tensor):
        if self.prompt_pending:
            self.prompt_pending = False
            return
        ids = value.reshape(len(self.rows), -1)   # (rows, new tokens): one token per row per step
        for r, row in enumerate(self.rows):
            if self.finished[r]:
                continue
            row.put(ids[r])
            if self.eos_ids & set(ids[r].tolist()):
                self.finished[r] = True

    def end(self):
        for row in self.rows:
            row.end()


_END = object()
_POLL_S = 0.01  # how often an iterating thread looks at the stop events while waiting for the next piece


class ChatStream:
    """Iterator over the text pieces of one answer (or, with `rows`, (row, piece) of a batch of answers) while
    `generate` runs in a worker thread.

    Iterating ends when the answer is complete, stopped (the caller's `cancel_event`, `cancel()`, or `close()`)
    or failed; a failure in generation is re-raised in the iterating thread. `tokens` counts generated tokens.
    """

    def __init__(self, generate: Callable[[StoppingCriteria, BaseStreamer], None],
                 tokenizer, cancel_event: threading.Event | None, on_finished: Callable[[], None],
                 rows: int | None = None, eos_ids: set[int] = frozenset()):
        self._queue: queue.Queue = queue.Queue()
        self._abort = threading.Event()
        self._cancel_event = cancel_event
        # rows: a batch of answers generated together, whose pieces come as (row, text); None: one answer, text.
        self._streamer = _PieceStreamer(tokenizer, self._queue) if rows is None else \
            _RowsStreamer(tokenizer, self._queue, rows, set(eos_ids))
        self._criteria = _CancelCriteria(self._abort, cancel_event)
        self._generate = generate
        self._on_finished = on_finished
        self._error: BaseException | None = None
        self._done = False
        self.finished = threading.Event()  # set once generate() has returned and let go of the model
        self._thread = threading.Thread(target=self._work, name="chat-generate", daemon=True)
        self._thread.start()

    @property
    def tokens(self) -> int:
        return self._streamer.tokens

    def _work(self):
        try:
            if not any(e.is_set() for e in self._criteria.events):
                self._generate(self._criteria, self._streamer)
        except BaseException as exc:  # handed to the iterating thread, which re-raises it
            # The frames' locals reference the model; clearing them keeps a stored error from pinning the
            # weights after unload (file and line information stays for the traceback).
            traceback.clear_frames(exc.__traceback__)
            self._error = exc
        finally:
            self._generate = None  # drop the closure (it references the model) as soon as we are done
            self.finished.set()
            self._on_finished()
            self._queue.put(_END)

    def __iter__(self):
        return self

    @property
    def stopping(self) -> bool:
        """A stop was requested (the model may still be finishing the token in flight)."""
        return any(e.is_set() for e in self._criteria.events)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until generate() has returned; True if it has."""
        return self.finished.wait(timeout)

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        # Poll so that a stop ends the iteration at once, without waiting for the forward pass in flight (a
        # token can take longer than 100 ms on a CPU); generation itself lets go of the model after that token.
        while True:
            if self.stopping:
                self._done, self._error = True, None
                raise StopIteration
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if item is _END:
            self._done = True
            self._thread.join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration
        return item

    def cancel(self, wait: bool = True):
        """Stop after the token in flight; with `wait`, return once generation has let go of the model."""
        self._abort.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def close(self):
        """Stop and forget the rest of the answer: what an abandoned `for piece in stream` loop needs."""
        self.cancel(wait=True)
        self._done = True
        self._error = None  # the caller has walked away from this answer; a late failure concerns nobody

    def __del__(self):
        # An abandoned stream must not keep generating into a queue nobody reads.
        self._abort.set()
