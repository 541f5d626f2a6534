"""Handover between chat and training on CPU with the tiny Llama: states, unloading, and restoring chat."""
from __future__ import annotations

import asyncio
import shutil
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine.chat.generation import GenerationSettings
from engine.chat.handover import Handover, HandoverState, WeightsStillReferenced
from engine.chat.inference import AdapterError, ChatEngine, TrainingInProgress
from tests.chat_helpers import make_adapter, peft_reference

S = HandoverState
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]
TEXT = "LoRA adapters add a low rank update."


@dataclass
class Outcome:
    adapter_dir: Path | None


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("handover-adapters")
    return {"previous": make_adapter(tiny_llama_dir, root / "previous", seed=11),
            "new": make_adapter(tiny_llama_dir, root / "new", seed=12, target_modules=("k_proj", "o_proj"))}


@pytest.fixture
def chat(tiny_llama_dir, adapters):
    engine = ChatEngine(device="cpu", dtype=torch.float32)
    engine.load(tiny_llama_dir)
    engine.set_active_adapter(engine.load_adapter(adapters["previous"]))
    yield engine
    engine.unload()


@pytest.fixture
def handover(chat):
    coordinator = Handover(chat)
    yield coordinator
    coordinator.close()
    assert chat.generation_listeners == []


def assert_logits_of(chat, model_dir, adapter_dir):
    reference = peft_reference(model_dir, adapter_dir)
    ids = chat.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0]
    torch.testing.assert_close(chat.logits(TEXT), expected, rtol=1e-4, atol=1e-5)


def test_training_gets_the_device_and_chat_returns_with_the_new_adapter(chat, handover, adapters,
                                                                         tiny_llama_dir):
    seen, calls = [], []
    handover.listeners.append(seen.append)
    param = weakref.ref(next(chat._model.parameters()))

    def run():
        calls.append("run")
        assert handover.state is S.TRAINING
        assert not chat.loaded and param() is None  # no chat weights while training holds the GPU
        with pytest.raises(TrainingInProgress, match="training in progress"):
            chat.stream_chat(HELLO)
        with pytest.raises(TrainingInProgress):
            chat.load(tiny_llama_dir)
        return Outcome(adapters["new"])

    result = asyncio.run(handover.train(run, release=lambda: calls.append("release")))
    assert result == Outcome(adapters["new"]) and calls == ["run", "release"]
    assert chat.adapters == ("previous", "new") and chat.active_adapter == "new"
    assert_logits_of(chat, tiny_llama_dir, adapters["new"])
    assert [(t.previous, t.state) for t in seen] == [(S.IDLE, S.UNLOADING), (S.UNLOADING, S.TRAINING),
                                                     (S.TRAINING, S.RELOADING), (S.RELOADING, S.IDLE)]
    assert all(t.seconds >= 0 for t in seen) and seen == handover.history
    assert "".join(chat.stream_chat(HELLO, GenerationSettings(max_new_tokens=3, temperature=0))) is not None


@pytest.mark.parametrize("outcome", ["raises", "stopped without adapter"])
def test_failed_or_empty_training_restores_the_previous_adapter(chat, handover, adapters, tiny_llama_dir,
                                                                 outcome):
    released = []

    def run():
        if outcome == "raises":
            raise RuntimeError("shader compilation failed")
        return Outcome(None)

    if outcome == "raises":
        with pytest.raises(RuntimeError, match="shader compilation failed"):
            asyncio.run(handover.train(run, release=lambda: released.append(True)))
    else:
        assert asyncio.run(handover.train(run, release=lambda: released.append(True))) == Outcome(None)
    assert released == [True]
    assert chat.loaded and chat.adapters == ("previous",) and chat.active_adapter == "previous"
    assert handover.state is S.IDLE
    assert_logits_of(chat, tiny_llama_dir, adapters["previous"])


def test_retraining_into_the_same_folder_reloads_its_new_weights(chat, handover, adapters, tiny_llama_dir,
                                                                 tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(adapters["previous"], folder)
    chat.set_active_adapter(None)
    chat.load_adapter(folder)  # named "mine"

    def run():
        shutil.rmtree(folder)
        make_adapter(tiny_llama_dir, folder, seed=99)
        return Outcome(folder)

    asyncio.run(handover.train(run))
    assert chat.adapters == ("previous", "mine") and chat.active_adapter == "mine"
    assert_logits_of(chat, tiny_llama_dir, folder)


def test_an_answer_being_generated_is_stopped_first(chat, handover):
    stream = chat.stream_chat(HELLO, GenerationSettings(max_new_tokens=2000, temperature=1.0, seed=4))
    pieces = []
    reader = threading.Thread(target=lambda: pieces.extend(stream))  # the GUI's worker thread
    reader.start()
    assert handover.state is S.GENERATING

    def run():
        assert stream.finished.is_set() and stream.tokens < 2000
        return None

    asyncio.run(handover.train(run))
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert [t.state for t in handover.history] == [S.GENERATING, S.UNLOADING, S.TRAINING, S.RELOADING, S.IDLE]
    assert chat.active_adapter == "previous"


def test_requests_during_training_get_a_clear_answer(chat, handover):
    started, finish = threading.Event(), threading.Event()

    def run():
        started.set()
        finish.wait(10)

    async def scenario():
        task = asyncio.ensure_future(handover.train(run))
        while not started.is_set():
            await asyncio.sleep(0.005)
        with pytest.raises(TrainingInProgress, match="already in progress"):
            await handover.train(run)
        with pytest.raises(TrainingInProgress, match="comes back"):
            chat.stream_chat(HELLO)
        finish.set()
        await task

    asyncio.run(scenario())
    assert chat.loaded and handover.state is S.IDLE


def test_cancelling_the_coroutine_still_waits_for_training(chat, handover):
    started, finish = threading.Event(), threading.Event()
    loaded_during_run = []

    def run():
        started.set()
        finish.wait(10)
        loaded_during_run.append(chat.loaded)

    async def scenario():
        task = asyncio.ensure_future(handover.train(run))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done() and not chat.loaded  # chat must not come back while training runs
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert loaded_during_run == [False]
    assert chat.loaded and chat.active_adapter == "previous" and handover.state is S.IDLE


def test_training_does_not_start_while_chat_weights_are_still_referenced(chat, handover):
    kept = next(chat._model.parameters())
    ran = []
    with pytest.raises(WeightsStillReferenced, match="training was not started"):
        asyncio.run(handover.train(lambda: ran.append(True)))
    del kept
    assert ran == [] and chat.loaded and chat.active_adapter == "previous"
    assert S.TRAINING not in [t.state for t in handover.history]


def test_a_new_adapter_that_does_not_fit_leaves_chat_as_it_was(chat, handover, tiny_model_dirs, tmp_path,
                                                               tiny_llama_dir, adapters):
    foreign = make_adapter(tiny_model_dirs["qwen2"], tmp_path / "qwen2-adapter", seed=3)
    with pytest.raises(AdapterError, match="does not fit"):
        asyncio.run(handover.train(lambda: Outcome(foreign)))
    assert chat.adapters == ("previous",) and chat.active_adapter == "previous"
    assert_logits_of(chat, tiny_llama_dir, adapters["previous"])
    assert handover.state is S.IDLE


def test_training_without_a_chat_model(tiny_llama_dir, adapters):
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    handover = Handover(chat)
    assert asyncio.run(handover.train(lambda: Outcome(adapters["new"]))) == Outcome(adapters["new"])
    assert not chat.loaded and handover.state is S.IDLE


def test_an_adapter_deleted_during_training_does_not_keep_chat_away(chat, handover, adapters, tiny_llama_dir,
                                                                     tmp_path):
    doomed = tmp_path / "doomed"
    shutil.copytree(adapters["previous"], doomed)
    chat.load_adapter(doomed)

    def run():
        shutil.rmtree(doomed)
        return Outcome(adapters["new"])

    with pytest.raises(AdapterError, match="chat model is back.*doomed"):
        asyncio.run(handover.train(run))
    assert chat.adapters == ("previous", "new") and chat.active_adapter == "new"
    assert_logits_of(chat, tiny_llama_dir, adapters["new"])
    assert handover.state is S.IDLE
