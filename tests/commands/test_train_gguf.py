"""A `.gguf` model trains as it is (issue 15): `lora-lab train --model tiny-q4_0.gguf` on the CPU backend writes no
dequantized weights anywhere, and its adapter gives PEFT, on transformers' own dequantization of the same file,
the loss our eval reports; chat answers with it."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.gguf_base import write_gguf_base
from bench.tiny_models import make_model
from tests.commands.test_train import TRAIN, run_json
from tests.perplexity_reference import hf_guide_perplexity

TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is "
        "Paris.\nLoRA adapters add a low rank update to the frozen weights of a language model.\n")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama whose 2-D weights (embedding included) are q4_0 and q8_0 in turn; every row is whole blocks."""
    root = tmp_path_factory.mktemp("gguf")
    make_model("llama", root / "hf", hidden_size=96, intermediate_size=160)
    return write_gguf_base(root / "hf", root / "tiny-q4_0.gguf", ("q4_0", "q8_0"))


def transformers_base(gguf: Path):
    """The oracle's base: transformers' own GGUF loader, dequantized to float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.mark.slow
def test_a_gguf_trains_as_it_is_and_its_adapter_fits_peft_and_chat(tiny_gguf, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    from engine.chat.generation import GenerationSettings
    from engine.chat.inference import ChatEngine
    from engine.model.references import resolve_model
    from engine.model.weights import gguf_of
    from engine.train.runs import eval_stream

    home = tmp_path / "home"
    monkeypatch.setenv("LORA_LAB_HOME", str(home))
    corpus = tmp_path / "train.txt"
    corpus.write_text(TEXT * 12, encoding="utf-8")
    out = tmp_path / "adapter"
    lines = run_json(capsys, ["train", "--model", str(tiny_gguf), "--data", str(corpus), "--out", str(out),
                              "--steps", "12", *TRAIN])
    steps = [x["loss"] for x in lines if x["event"] == "step"]
    assert len(steps) == 12 and np.mean(steps[-3:]) < steps[0] - 0.3          # it learned

    # (a) The folder the .gguf resolved to holds config and tokenizer; the weights were read from the GGUF.
    folder = resolve_model(str(tiny_gguf))
    assert folder.is_relative_to(home) and gguf_of(folder) == tiny_gguf.resolve()
    assert sorted(p.relative_to(home) for p in home.rglob("*.safetensors")) == []
    assert not list(home.rglob("*.gguf")), "the GGUF itself must not be copied either"

    # (b) PEFT on transformers' dequantization of the file: the loss our eval reports.
    (ours,) = run_json(capsys, ["eval", "--model", str(tiny_gguf), "--data", str(corpus), "--seq-len", "32",
                                "--backend", "cpu", "--adapter", str(out), "--json"])
    ids, labels = eval_stream([corpus], folder)
    peft_model = PeftModel.from_pretrained(transformers_base(tiny_gguf), out).eval()
    peft_ppl, tokens = hf_guide_perplexity(peft_model, ids, labels, 32, 16)
    assert tokens == ours["tokens"]
    assert abs(math.log(peft_ppl) - ours["loss"]) < 1e-3, (math.log(peft_ppl), ours["loss"])

    # (c) Chat loads the GGUF reference and answers with the adapter: in float32 exactly PEFT's greedy answer, and
    # by default (bfloat16 on this CPU) with its weights held in half precision.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    settings = GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    exact = ChatEngine(device="cpu", dtype=torch.float32)
    exact.load(tiny_gguf)
    exact.set_active_adapter(exact.load_adapter(out))
    answer = "".join(exact.stream_chat(messages, settings))
    inputs = exact.prompt_inputs(messages)
    expected = peft_model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer == exact.tokenizer.decode(expected, skip_special_tokens=True) and answer.strip()
    text = "What is the capital of France?"
    with torch.no_grad():
        reference = peft_model(input_ids=exact.tokenizer(text, return_tensors="pt")["input_ids"]).logits[0]
    torch.testing.assert_close(exact.logits(text), reference, rtol=1e-4, atol=1e-5)
    assert (exact.logits(text) - exact.logits(text, adapter=None)).abs().max() > 1e-2   # the adapter matters
    exact.unload()

    half = ChatEngine(device="cpu")
    half.load(tiny_gguf)
    half.set_active_adapter(half.load_adapter(out))
    assert "".join(half.stream_chat(messages, settings)).strip()
    base = half._model.get_base_model()
    assert {p.dtype for n, p in base.named_parameters() if "lora_" not in n} == {half.dtype}
    assert half.dtype in (torch.bfloat16, torch.float16) or not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    half.unload()
