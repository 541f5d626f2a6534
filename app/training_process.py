"""A training run in its own process (no Qt here: this module is what the child process imports).

Why a process: building the CPU backend (ONNX graphs, onnxruntime sessions) and parts of the WGSL setup run long
native calls that hold Python's GIL for hundreds of milliseconds; in a thread of the GUI process they would freeze
the window. In a child process they cannot, and the device memory is certainly released when the child exits,
which is what the chat handover needs.

The child sends ("step" | "eval" | "checkpoint", event), ("log" | "phase", text), ("before", loss, tokens),
("paused", step), and finally
("summary", TrainSummary) or ("error", message, traceback) over a queue; the parent sends "pause", "resume" or
"stop" the other way.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import threading
import traceback
from typing import Callable

CONTEXT = multiprocessing.get_context("spawn")   # never fork a process that runs Qt threads


class TrainingFailed(RuntimeError):
    """The run failed in the training process; the message is the trainer's."""


# ---- child --------------------------------------------------------------------------------------------------
def child_main(request, events, control) -> None:
    if hasattr(os, "nice"):
        # Training is a background job: when cores are scarce, the window's process should get them first.
        os.nice(10)
    try:
        summary = _train(request, events, control)
        events.put(("summary", dataclasses.replace(summary, lora_state={})))
    except BaseException as exc:  # everything goes to the window as a message
        message = str(exc) if type(exc).__name__ in ("TrainingError", "NonFiniteError") \
            else f"{type(exc).__name__}: {exc}"
        events.put(("error", message, traceback.format_exc()))


def _train(request, events, control):
    from engine.backends.base import MemoryOptions
    from engine.backends.hardware import cpu_threads
    from engine.model.references import resolve_model
    from engine.train.runs import RunInputs, backend_factory, prepare_run
    from engine.train.trainer import TrainerCallback, eval_loss

    log = lambda text: events.put(("log", text))   # noqa: E731
    phase = lambda text: events.put(("phase", text))   # noqa: E731   what happens before the first step

    class Callback(TrainerCallback):
        def on_step(self, event):
            events.put(("step", event))

        def on_eval(self, event):
            events.put(("eval", event))

        def on_checkpoint(self, event):
            events.put(("checkpoint", event))

        def on_failure(self, step, message):
            log(f"training failed at step {step}: {message}")

        def on_paused(self, step):
            events.put(("paused", step))

    model_dir = resolve_model(request.model, log=log)
    # One core stays with the window: onnxruntime's pool threads spin while they wait for work, and on a small
    # machine they would take every core from the event loop.
    inner = backend_factory(request.backend, model_dir, on_choice=lambda choice: [log(x) for x in choice.lines()],
                            threads=max(1, cpu_threads() - 1))
    holder = {}

    def factory(lora, optim, batch_size, seq_len, seed=0, init_state=None, memory=MemoryOptions()):
        phase(f"measuring the training backends on [{batch_size}, {seq_len}] (skipped when measured before)"
              if request.backend == "auto" else f"starting the {request.backend} backend")
        backend = inner(lora, optim, batch_size, seq_len, seed=seed, init_state=init_state, memory=memory)
        log(f"training backend: {backend.name}")
        val = holder.get("val")
        if init_state is None and val and request.config.objective == "sft":
            # A fresh adapter starts with B = 0, so this is exactly the base model on the validation data. (Not
            # for DPO/ORPO: their validation batches are pairs, judged by reward margin and accuracy, not perplexity.)
            phase("evaluating the base model on the validation data")
            loss, tokens = eval_loss(backend, val)
            events.put(("before", loss, tokens))
        return backend

    phase("reading the corpus and planning memory")
    inputs = RunInputs(model=request.model, data=request.files, val_split=request.val_split,
                       mask_prompt=request.mask_prompt, packing=request.packing, backend=request.backend)
    prepared = prepare_run(request.config, inputs, request.out_dir, callback=Callback(), factory=factory, log=log)
    trainer = prepared.trainer
    holder["val"] = trainer.val
    threading.Thread(target=_obey, args=(control, trainer), daemon=True).start()
    return trainer.run()


def _obey(control, trainer) -> None:
    while True:
        command = control.get()
        if command == "pause":
            trainer.pause()
        elif command == "resume":
            trainer.resume()
        elif command == "stop":
            trainer.stop()


# ---- parent -------------------------------------------------------------------------------------------------
class TrainingProcess:
    """Runs one request in a child process; `run()` blocks (call it from a worker thread) and returns the
    TrainSummary. `on_event(kind, *payload)` gets every event on the calling thread."""

    def __init__(self, request, on_event: Callable[..., None]):
        self.request, self.on_event = request, on_event
        self._control = CONTEXT.Queue()

    def send(self, command: str) -> None:
        self._control.put(command)

    def run(self):
        events = CONTEXT.Queue()
        process = CONTEXT.Process(target=child_main, args=(self.request, events, self._control),
                                  name="lora-lab-training", daemon=True)
        process.start()
        try:
            while True:
                try:
                    message = events.get(timeout=0.2)
                except queue.Empty:
                    if not process.is_alive():
                        raise TrainingFailed(f"the training process ended unexpectedly (exit code "
                                             f"{process.exitcode}); see the log") from None
                    continue
                kind, payload = message[0], message[1:]
                if kind == "summary":
                    return payload[0]
                if kind == "error":
                    self.on_event("log", payload[1])      # the child's traceback, for the log pane
                    raise TrainingFailed(payload[0])
                self.on_event(kind, *payload)
        finally:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


def run_in_child(fn: Callable, *args):
    """fn(*args) in a fresh process, for engine work that holds the GIL in long native calls (building an
    onnxruntime backend, say); call it from a worker thread. fn and its result must pickle."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=CONTEXT) as pool:
        return pool.submit(fn, *args).result()
