"""ChatEngine on CPU with tiny random models: streaming, stop latency, adapters against PEFT, unload.

The engines here load in float32 (chat's default on the CPU is bfloat16, engine.chat.fit) so that their logits and
greedy answers can be compared exactly with the float32 PEFT oracle."""
from __future__ import annotations

import gc
import json
import shutil
import threading
import time
import weakref

import numpy as np
import psutil
import pytest
import torch

from engine.chat.generation import GenerationSettings
from engine.corpus import DEFAULT_CHAT_TEMPLATE, IGNORE_LABEL, CorpusConfig, load_corpus, load_tokenizer
from engine.chat.inference import (ACTIVE, AdapterError, ChatBusy, ChatEngine, ModelNotLoaded,
                              TrainingInProgress, best_device, trim_process_heap)
from tests.chat_helpers import make_adapter, make_weighty_llama, peft_reference

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """Two different LoRA adapters for the tiny Llama: a on q/v, b on every projection."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_llama_dir, root / "a", seed=1),
        "b": make_adapter(tiny_llama_dir, root / "b", seed=2,
                          target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj")),
    }


@pytest.fixture
def engine(tiny_llama_dir):
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(tiny_llama_dir)
    yield chat
    chat.unload()


# -- settings and device ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("max_new_tokens", True), ("temperature", -0.1),
    ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0), ("seed", -3), ("seed", "7"),
])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        GenerationSettings(**{field: value})


def test_settings_greedy_and_sampling_kwargs():
    greedy = GenerationSettings(temperature=0, top_k=5).generate_kwargs()
    assert greedy["do_sample"] is False and greedy["top_k"] is None
    sampled = GenerationSettings(temperature=0.5, top_p=0.8, top_k=7, repetition_penalty=1.2).generate_kwargs()
    assert sampled == dict(max_new_tokens=256, do_sample=True, temperature=0.5, top_p=0.8, top_k=7,
                           repetition_penalty=1.2)


def test_best_device_prefers_cuda_then_mps(monkeypatch):
    assert best_device().type == ("cuda" if torch.cuda.is_available() else
                                  "mps" if torch.backends.mps.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert best_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert best_device().type == "mps"


# -- chat and streaming ----------------------------------------------------------------------------------------
def test_prompt_goes_through_chat_template(engine):
    ids = engine.prompt_inputs(HELLO)["input_ids"][0].tolist()
    tokenizer = engine.tokenizer
    expected = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|im_start|>assistant\n")
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]


def without_chat_template(model_dir, folder):
    """A copy of a model folder whose tokenizer carries no chat template (as many base models ship)."""
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_model_without_chat_template_gets_the_corpus_fallback(tiny_llama_dir, tmp_path):
    folder = without_chat_template(tiny_llama_dir, tmp_path / "no-template")
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(folder)
    assert chat.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = chat.tokenizer.decode(chat.prompt_inputs(HELLO)["input_ids"][0])
    assert prompt == "Be brief.\n\n### User:\nWhat is the capital of France?\n\n### Assistant:\n"
    chat.unload()


def test_a_template_less_base_is_prompted_with_the_tokens_it_was_trained_on(tiny_llama_dir, tmp_path):
    """Training renders chats through the corpus; chat prompts through the chat engine: the prompt part of a
    trained example and the chat prompt for the same history must be the same token ids."""
    folder = without_chat_template(tiny_llama_dir, tmp_path / "no-template")
    data = tmp_path / "chats.jsonl"
    answer = {"role": "assistant", "content": "Paris."}
    data.write_text(json.dumps({"messages": [*HELLO, answer]}) + "\n")
    corpus = load_corpus([data], load_tokenizer(folder), CorpusConfig(seq_len=128))
    (sequence,) = corpus.train
    trained = np.flatnonzero(sequence.labels != IGNORE_LABEL)
    taught_prompt = sequence.input_ids[:trained[0]].tolist()
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(folder)
    assert chat.prompt_inputs(HELLO)["input_ids"][0].tolist() == taught_prompt
    chat.unload()


def test_loading_something_that_is_not_a_model_says_so(tmp_path, tiny_llama_dir, adapters):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ChatEngine(device="cpu", dtype=torch.float32).load(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="is a LoRA adapter, not a base model"):
        ChatEngine(device="cpu", dtype=torch.float32).load(adapters["a"])


def test_a_gguf_reference_loads_the_folder_it_converts_to(tiny_llama_dir, tmp_path, monkeypatch):
    """References go through engine.model.references (the conversion itself is tested there); the snapshot keeps both."""
    import engine.model.references

    from bench.gguf_base import write_gguf_base

    gguf = write_gguf_base(tiny_llama_dir, tmp_path / "model.Q4_1.gguf")   # a whole file: a cut one is refused
    converted = []
    monkeypatch.setattr(engine.model.references, "convert_gguf_cached",
                        lambda path, log: converted.append(path) or tiny_llama_dir)
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    chat.load(gguf)
    assert converted == [gguf] and chat.model_ref == str(gguf)
    snapshot = chat.snapshot()
    assert snapshot.model_path == tiny_llama_dir
    chat.unload()
    chat.restore(snapshot)  # straight from the converted folder: no second conversion
    assert converted == [gguf] and chat.loaded
    chat.unload()


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty"), ([{"role": "user"}], "message 0"), ([{"role": "bot", "content": "hi"}], "role 'bot'"),
])
def test_bad_messages_are_refused(engine, messages, match):
    with pytest.raises(ValueError, match=match):
        engine.stream_chat(messages)


def test_streaming_yields_the_same_text_as_generate(tiny_model_dirs):
    """Greedy streaming, piece by piece, concatenates to what transformers' generate produces in one go."""
    for arch in ("llama", "qwen3"):
        model_dir = tiny_model_dirs[arch]
        chat = ChatEngine(device="cpu", dtype=torch.float32)
        chat.load(model_dir)
        settings = GenerationSettings(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
        stream = chat.stream_chat(HELLO, settings)
        pieces = list(stream)
        reference = peft_reference(model_dir, None)
        inputs = chat.prompt_inputs(HELLO)
        out = reference.generate(**inputs, max_new_tokens=16, do_sample=False)
        new_ids = out[0, inputs["input_ids"].shape[1]:]
        assert stream.tokens == len(new_ids)
        assert len(pieces) > 1, "the answer must arrive in several pieces, not at the end"
        assert "".join(pieces) == chat.tokenizer.decode(new_ids, skip_special_tokens=True)
        chat.unload()


def test_seed_makes_sampling_repeatable(engine):
    def answer(seed):
        return "".join(engine.stream_chat(HELLO, GenerationSettings(max_new_tokens=30, temperature=1.0,
                                                                    top_k=0, seed=seed)))
    assert answer(7) == answer(7)
    assert answer(7) != answer(8)


def test_stop_ends_the_stream_within_100_ms(engine):
    cancel = threading.Event()
    settings = GenerationSettings(max_new_tokens=2000, temperature=1.0, top_k=0, seed=3)
    stream = engine.stream_chat(HELLO, settings, cancel_event=cancel)
    for _ in range(3):
        next(stream)
    assert engine.generating
    stopped = time.perf_counter()
    cancel.set()
    rest = list(stream)
    latency = time.perf_counter() - stopped
    assert latency < 0.1, f"stop took {latency * 1000:.0f} ms"
    assert rest == []  # nothing after a stop
    assert stream.wait(timeout=1) and not engine.generating  # generation let go of the model a token later
    assert stream.tokens < 2000
    assert "".join(engine.stream_chat(HELLO, GenerationSettings(max_new_tokens=3, temperature=0)))  # usable again


def test_stop_is_quick_even_when_a_token_takes_longer_than_100_ms(engine):
    """On a slow device the stream ends at once; the engine waits for the token in flight before the next answer."""
    layer = engine._model.model.layers[0]
    handle = layer.register_forward_hook(lambda *_: time.sleep(0.3))  # a device that needs 300 ms per token
    try:
        cancel = threading.Event()
        stream = engine.stream_chat(HELLO, GenerationSettings(max_new_tokens=50, temperature=1.0, top_k=0, seed=3),
                                    cancel_event=cancel)
        while stream.tokens < 1:
            time.sleep(0.005)
        stopped = time.perf_counter()
        cancel.set()
        list(stream)
        assert time.perf_counter() - stopped < 0.1
        assert engine.generating  # the token in flight is still being computed
    finally:
        handle.remove()
    answer = engine.stream_chat(HELLO, GenerationSettings(max_new_tokens=3, temperature=0))  # waits, not ChatBusy
    assert stream.tokens < 50
    list(answer)
    assert not engine.generating


def test_cancel_and_close_stop_generation(engine):
    settings = GenerationSettings(max_new_tokens=2000, temperature=1.0, top_k=0, seed=3)
    stream = engine.stream_chat(HELLO, settings)
    next(stream)
    engine.cancel()  # what the handover does: returns once generation has let go of the model
    assert not engine.generating and stream.tokens < 2000
    stream = engine.stream_chat(HELLO, settings)
    next(stream)
    stream.close()  # an abandoned loop
    assert not engine.generating and list(stream) == []


def test_one_answer_at_a_time(engine, adapters):
    events = []
    engine.generation_listeners.append(events.append)
    stream = engine.stream_chat(HELLO, GenerationSettings(max_new_tokens=2000, temperature=1.0, seed=1))
    next(stream)
    with pytest.raises(ChatBusy, match="stop it or wait"):
        engine.stream_chat(HELLO)
    with pytest.raises(ChatBusy):
        engine.load_adapter(adapters["a"])
    stream.close()
    assert events == [True, False]


def test_requests_without_model_or_during_training_get_clear_errors(tiny_llama_dir):
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    with pytest.raises(ModelNotLoaded, match="load a model first"):
        chat.stream_chat(HELLO)
    chat.load(tiny_llama_dir)
    chat.lock_out(TrainingInProgress("training in progress; chat comes back when it ends"))
    with pytest.raises(TrainingInProgress, match="training in progress"):
        chat.stream_chat(HELLO)
    chat.lock_out(None)
    assert "".join(chat.stream_chat(HELLO, GenerationSettings(max_new_tokens=2, temperature=0))) is not None
    chat.unload()


# -- adapters --------------------------------------------------------------------------------------------------
def _close(actual, model, text_ids):
    with torch.no_grad():
        expected = model(input_ids=text_ids).logits[0]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_adapters_switch_without_reloading_the_base(engine, adapters, tiny_llama_dir):
    ids = engine.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    base_logits = engine.logits(TEXT)
    _close(base_logits, peft_reference(tiny_llama_dir, None), ids)
    embed = engine._model.get_input_embeddings().weight
    assert engine.load_adapter(adapters["a"]) == "a"
    assert engine.load_adapter(adapters["b"]) == "b"
    assert engine.adapters == ("a", "b") and engine.active_adapter is None
    torch.testing.assert_close(engine.logits(TEXT), base_logits)  # loading does not activate

    engine.set_active_adapter("a")
    logits_a = engine.logits(TEXT)
    _close(logits_a, peft_reference(tiny_llama_dir, adapters["a"]), ids)
    engine.set_active_adapter("b")
    logits_b = engine.logits(TEXT)
    _close(logits_b, peft_reference(tiny_llama_dir, adapters["b"]), ids)
    for one, other in [(logits_a, base_logits), (logits_b, base_logits), (logits_a, logits_b)]:
        assert (one - other).abs().max() > 1e-2

    # Compare mode: the base (or another adapter) for one call, leaving the active adapter alone.
    torch.testing.assert_close(engine.logits(TEXT, adapter=None), base_logits)
    torch.testing.assert_close(engine.logits(TEXT, adapter="a"), logits_a)
    assert engine.active_adapter == "b"
    engine.set_active_adapter(None)
    torch.testing.assert_close(engine.logits(TEXT), base_logits)
    assert engine._model.get_input_embeddings().weight is embed  # same base weights throughout


def test_compare_mode_answers_with_base_and_adapter(engine, adapters, tiny_llama_dir):
    engine.set_active_adapter(engine.load_adapter(adapters["b"]))
    settings = GenerationSettings(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    inputs = engine.prompt_inputs(HELLO)
    n = inputs["input_ids"].shape[1]
    for adapter, reference in [(None, None), (ACTIVE, adapters["b"])]:
        answer = "".join(engine.stream_chat(HELLO, settings, adapter=adapter))
        out = peft_reference(tiny_llama_dir, reference).generate(**inputs, max_new_tokens=16, do_sample=False)
        assert answer == engine.tokenizer.decode(out[0, n:], skip_special_tokens=True)


def test_side_by_side_answers_grow_together_and_match_each_model_alone(engine, adapters, tiny_llama_dir):
    """Compare mode used to answer with the base, then the adapter (the adapter's column waited minutes). One batch
    answers both: the pieces interleave, and each column is what its model answers alone (prompts of different
    lengths: the shorter is left-padded)."""
    engine.set_active_adapter(engine.load_adapter(adapters["b"]))
    settings = GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    longer = [HELLO[0], {"role": "user", "content": "And what is the capital of Italy, in one short word?"}]
    jobs = [(longer, None), (HELLO, "b")]
    order, texts = [], ["", ""]
    stream = engine.stream_side_by_side(jobs, settings)
    for column, piece in stream:
        order.append(column)
        texts[column] += piece
    assert order.index(1) < len(order) - 1 - order[::-1].index(0), order   # column 1 began before column 0 ended
    assert stream.tokens == 2 * 12
    for (messages, _), text, reference in zip(jobs, texts, (None, adapters["b"])):
        inputs = engine.prompt_inputs(messages)
        out = peft_reference(tiny_llama_dir, reference).generate(**inputs, max_new_tokens=12, do_sample=False)
        assert text == engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not engine.generating and engine.active_adapter == "b"


def test_a_dora_adapter_is_not_batched_with_the_base(engine, adapters, tiny_llama_dir, tmp_path):
    """peft's per-row adapters refuse DoRA: the engine says so before generating (compare then answers in turn)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    dora, plain = engine.load_adapter(tmp_path / "dora"), engine.load_adapter(adapters["a"])
    assert engine.side_by_side_supported([None, plain]) and not engine.side_by_side_supported([None, dora])
    with pytest.raises(ValueError, match="cannot answer in one batch"):
        engine.stream_side_by_side([(HELLO, None), (HELLO, dora)])
    assert not engine.generating


def test_switching_during_an_answer_applies_to_the_next_one(engine, adapters):
    engine.set_active_adapter(engine.load_adapter(adapters["b"]))
    settings = GenerationSettings(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    with_b = "".join(engine.stream_chat(HELLO, settings))
    stream = engine.stream_chat(HELLO, settings)
    engine.set_active_adapter(None)
    assert "".join(stream) == with_b
    base = "".join(engine.stream_chat(HELLO, settings))
    assert base != with_b and base == "".join(engine.stream_chat(HELLO, settings, adapter=None))


def test_adapter_errors_are_clear_and_leave_the_engine_working(engine, adapters, tiny_model_dirs, tmp_path):
    base_logits = engine.logits(TEXT)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.load_adapter(tmp_path)
    foreign = make_adapter(tiny_model_dirs["qwen2"], tmp_path / "qwen2-adapter", seed=5)
    with pytest.raises(AdapterError, match="does not fit model"):
        engine.load_adapter(foreign)  # first adapter: the base must come out clean
    torch.testing.assert_close(engine.logits(TEXT), base_logits)
    assert engine.load_adapter(adapters["a"]) == "a"
    with pytest.raises(AdapterError, match="does not fit model"):
        engine.load_adapter(foreign)  # a later adapter: the others stay
    assert engine.adapters == ("a",)
    with pytest.raises(AdapterError, match="already used"):
        engine.load_adapter(adapters["b"], name="a")
    with pytest.raises(AdapterError, match="loaded: a"):
        engine.set_active_adapter("nope")
    assert engine.load_adapter(adapters["a"]) == "a-2"  # the same folder dragged in twice


def test_remove_adapter(engine, adapters, tiny_llama_dir):
    base_logits = engine.logits(TEXT)
    engine.load_adapter(adapters["a"])
    engine.set_active_adapter(engine.load_adapter(adapters["b"]))
    engine.remove_adapter("a")
    ids = engine.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    _close(engine.logits(TEXT), peft_reference(tiny_llama_dir, adapters["b"]), ids)
    engine.remove_adapter("b")
    assert engine.adapters == () and engine.active_adapter is None
    torch.testing.assert_close(engine.logits(TEXT), base_logits)


# -- unload ----------------------------------------------------------------------------------------------------
def test_unload_frees_every_tensor_and_the_memory(tiny_llama_dir, tmp_path, adapters):
    weight_bytes = make_weighty_llama(tiny_llama_dir, tmp_path / "weighty")
    process = psutil.Process()
    chat = ChatEngine(device="cpu", dtype=torch.float32)
    gc.collect()
    trim_process_heap()  # so the load cannot reuse heap that earlier tests freed without the RSS moving
    before = process.memory_info().rss
    chat.load(tmp_path / "weighty")
    chat.logits(TEXT)  # touch every weight: safetensors maps them lazily
    param = weakref.ref(next(chat._model.parameters()))
    loaded = process.memory_info().rss
    report = chat.unload()
    after = process.memory_info().rss
    assert param() is None
    assert report.tensors_released > 0 and report.tensors_still_referenced == 0
    assert loaded - before > 0.9 * weight_bytes, (loaded - before, weight_bytes)
    assert loaded - after > 0.9 * weight_bytes, (loaded - after, weight_bytes)
    assert not chat.loaded and chat.adapters == ()


def test_unload_with_adapters_and_a_running_answer(engine, adapters):
    engine.set_active_adapter(engine.load_adapter(adapters["a"]))
    params = [weakref.ref(p) for p in engine._model.parameters()]
    lora = [weakref.ref(p) for n, p in engine._model.named_parameters() if "lora_" in n]
    assert lora
    stream = engine.stream_chat(HELLO, GenerationSettings(max_new_tokens=2000, temperature=1.0, seed=1))
    next(stream)
    report = engine.unload()  # stops the answer first
    assert report.tensors_still_referenced == 0
    assert all(r() is None for r in params + lora)
    assert stream.tokens < 2000
    list(stream)  # the stream just ends
    with pytest.raises(ModelNotLoaded):
        engine.logits(TEXT)


def test_unload_reports_a_tensor_someone_still_holds(engine):
    kept = next(engine._model.parameters())
    report = engine.unload()
    assert report.tensors_still_referenced == 1
    del kept


def test_a_broken_model_folder_is_a_clear_error(tiny_llama_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"broken/model\.safetensors: its header claims .* corrupt or incomplete"):
        ChatEngine(device="cpu", dtype=torch.float32).load(folder)
