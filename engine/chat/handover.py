"""Hand the GPU from chat (torch) to training (wgpu) and back, so the two never hold model weights at once.

    idle/generating --train()--> unloading --> training --> reloading --> idle
                                (cancel answer,  (the blocking   (training releases its device;
                                 unload, empty    training runs   chat reloads with the new adapter,
                                 torch's cache)   in a thread)    or the previous one on failure)

`Handover.train` is a coroutine: the GUI awaits it through qasync, tests through plain asyncio. Blocking work
runs in worker threads so the event loop (the UI) stays responsive. While it runs, chat requests raise
`TrainingInProgress`. Every state change goes to `listeners` as a `Transition` (which also says how long the
previous state lasted and what torch held on the device at that moment).
"""
from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from engine.chat.inference import ChatEngine, TrainingInProgress, torch_memory

TRAINING_MESSAGE = ("training in progress: the chat model is unloaded while training uses the GPU; "
                    "it comes back, with the new adapter active, when training ends")


class HandoverState(enum.Enum):
    IDLE = "idle"
    GENERATING = "generating"
    UNLOADING = "unloading"
    TRAINING = "training"
    RELOADING = "reloading"


@dataclass(frozen=True)
class Transition:
    previous: HandoverState
    state: HandoverState
    seconds: float  # how long `previous` lasted: for unloading and reloading, the time that step took
    torch_memory: dict | None  # torch's allocated/reserved bytes on the chat device at this moment (None on CPU)


class TrainingOutcome(Protocol):
    """What a training callable returns: the folder it saved the adapter to, or None if it saved none."""

    adapter_dir: Path | None


class WeightsStillReferenced(RuntimeError):
    """Something outside the chat engine still holds chat model tensors, so training must not start."""


def _adapter_dir(result: Any) -> Path | None:
    if result is None:
        return None
    if isinstance(result, (str, Path)):
        return Path(result)
    folder = getattr(result, "adapter_dir", None)
    return Path(folder) if folder is not None else None


class Handover:
    """Coordinates one ChatEngine with training runs that need the same GPU."""

    def __init__(self, chat: ChatEngine):
        self.chat = chat
        self.listeners: list[Callable[[Transition], None]] = []
        self.history: list[Transition] = []
        self._lock = threading.Lock()  # state changes come from the event loop and the generating thread
        self._state = HandoverState.GENERATING if chat.generating else HandoverState.IDLE
        self._since = time.perf_counter()
        self._training = False
        self._cancelled = False
        chat.generation_listeners.append(self._on_generation)

    def close(self):
        """Stop following the chat engine's answers (a coordinator that is no longer used)."""
        if self._on_generation in self.chat.generation_listeners:
            self.chat.generation_listeners.remove(self._on_generation)

    @property
    def state(self) -> HandoverState:
        return self._state

    def _enter(self, state: HandoverState, only_from: tuple[HandoverState, ...] | None = None):
        with self._lock:
            if only_from is not None and self._state not in only_from:
                return
            now = time.perf_counter()
            transition = Transition(self._state, state, now - self._since, torch_memory(self.chat.device))
            self._state, self._since = state, now
            self.history.append(transition)
            for listener in list(self.listeners):
                listener(transition)

    def _on_generation(self, generating: bool):
        # Answers only move idle <-> generating; the end of an answer cancelled by unloading is not "idle".
        self._enter(HandoverState.GENERATING if generating else HandoverState.IDLE,
                    only_from=(HandoverState.IDLE, HandoverState.GENERATING))

    async def _in_thread(self, fn: Callable, *args):
        """Run `fn` in a worker thread and wait for it even if our task is cancelled meanwhile.

        A thread cannot be interrupted, and reloading chat while training still runs would put both on the
        GPU; so a cancellation is remembered, and train() re-raises it once the chat is back.
        """
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                self._cancelled = True
            except BaseException:
                break
        return task.result()

    async def train(self, run: Callable[[], Any], release: Callable[[], None] | None = None) -> Any:
        """Unload chat, run the blocking `run()` in a thread, then bring chat back; returns what `run` returned.

        `run` creates and frees its own wgpu device; it returns a TrainingOutcome (or the adapter folder, or
        None). `release`, if given, is called after `run` whatever happened (the training engine's close()).
        Afterwards the chat model is reloaded with the adapters it had, plus the new adapter made active; if
        `run` raised, the previous adapter stays active and the exception is re-raised. Stopping a run is the
        training's business (it returns early); cancelling this coroutine still waits for `run` to finish.
        """
        if self._training:
            raise TrainingInProgress("a training run is already in progress; wait for it to end or stop it")
        self._training, self._cancelled = True, False
        try:
            return await self._train(run, release)
        finally:
            self.chat.lock_out(None)
            self._training = False
            self._enter(HandoverState.GENERATING if self.chat.generating else HandoverState.IDLE)
            if self._cancelled:
                raise asyncio.CancelledError()

    async def _train(self, run, release):
        self.chat.lock_out(TrainingInProgress(TRAINING_MESSAGE))
        self._enter(HandoverState.UNLOADING)
        snapshot = await self._in_thread(self.chat.snapshot)  # waits for the engine lock off the event loop
        report = await self._in_thread(self.chat.unload)
        if report.tensors_still_referenced:
            self._enter(HandoverState.RELOADING)
            if snapshot is not None:
                await self._in_thread(self.chat.restore, snapshot)
            raise WeightsStillReferenced(
                f"{report.tensors_still_referenced} of the chat model's {report.tensors_released} tensors are "
                "still referenced outside the chat engine after unloading, so training was not started "
                "(both would hold weights on the GPU); close whatever keeps chat tensors (a compare view, a "
                "debugger) and try again")
        self._enter(HandoverState.TRAINING)
        failure: BaseException | None = None
        result = None
        try:
            result = await self._in_thread(run)
        except BaseException as exc:  # re-raised below, once chat is back
            failure = exc
        self._enter(HandoverState.RELOADING)
        if release is not None:
            try:
                await self._in_thread(release)
            except Exception as exc:
                failure = failure or exc
        if snapshot is not None:
            new_adapter = _adapter_dir(result) if failure is None else None
            try:
                await self._in_thread(self.chat.restore, snapshot, new_adapter)
            except Exception as exc:
                if failure is None:
                    raise
                failure.add_note(f"and the chat model could not be reloaded afterwards: {exc}")
        if failure is not None:
            raise failure
        return result
