"""Ollama Modelfile and note: ChatML templates converted (proved by rendering), others reported, never guessed."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from engine.export.ollama import (OLLAMA_CHATML_TEMPLATE, TemplateConversion, convert_chat_template, modelfile_text,
                           note_text, ollama_model_name)

# SmolLM2-Instruct's template: ChatML that injects a default system prompt when the chat has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: not ChatML, must not be converted.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _with_template(src, dst, template):
    shutil.copytree(src, dst)
    if template is None:
        (dst / "chat_template.jinja").unlink()
    else:
        (dst / "chat_template.jinja").write_text(template)
    return dst


def test_chatml_fixture_converts(tiny_llama_dir):
    conv = convert_chat_template(tiny_llama_dir)
    assert conv.template == OLLAMA_CHATML_TEMPLATE and conv.default_system is None
    assert conv.stops == ("<|im_start|>", "<|im_end|>")


def test_default_system_prompt_becomes_system(tiny_llama_dir, tmp_path):
    conv = convert_chat_template(_with_template(tiny_llama_dir, tmp_path / "smol", SMOLLM2_TEMPLATE))
    assert conv.template == OLLAMA_CHATML_TEMPLATE
    assert conv.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile_text("/models/smol.gguf", "./a.gguf", conv)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


@pytest.mark.parametrize("template, reason", [(LLAMA3_TEMPLATE, "not ChatML"), (None, "no chat template")],
                         ids=["llama3", "none"])
def test_other_templates_are_reported_not_guessed(tiny_llama_dir, tmp_path, template, reason):
    conv = convert_chat_template(_with_template(tiny_llama_dir, tmp_path / "base", template))
    assert conv.template is None and reason in conv.reason
    modelfile = modelfile_text("/m/base.gguf", "./a.gguf", conv)
    assert "TEMPLATE" not in modelfile.replace("# No TEMPLATE", "") and "PARAMETER stop" not in modelfile
    note = note_text("/m/base.gguf", "a.gguf", "a", "llama", 8.0, [4], conv)
    assert reason in note and "no TEMPLATE" in note


def test_modelfile_from_and_adapter_lines():
    conv = TemplateConversion(OLLAMA_CHATML_TEMPLATE, ("<|im_end|>",), None, "ChatML")
    gguf_base = modelfile_text("/m/base.Q8_0.gguf", "./tuned.gguf", conv).splitlines()
    assert "FROM /m/base.Q8_0.gguf" in gguf_base and "ADAPTER ./tuned.gguf" in gguf_base
    assert not any("needs the base model as GGUF" in line for line in gguf_base)
    hf_base = modelfile_text("HuggingFaceTB/SmolLM2-135M-Instruct", "./tuned.gguf", conv)
    assert "needs the base model as GGUF" in hf_base and "FROM HuggingFaceTB/SmolLM2-135M-Instruct" in hf_base
    assert 'TEMPLATE """' + OLLAMA_CHATML_TEMPLATE + '"""' in hf_base
    note = note_text("HuggingFaceTB/SmolLM2-135M-Instruct", "tuned.gguf", "tuned", "llama", 16.0, [8, 8], conv)
    assert "llama-cli -m BASE.gguf --lora tuned.gguf" in note and "ollama create tuned -f Modelfile" in note
    assert "convert_hf_to_gguf.py" in note


def test_model_name_is_ollama_safe(tmp_path):
    assert ollama_model_name(tmp_path / "My Adapter (v2)") == "my-adapter-v2"


GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var data struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&data.Messages); err != nil { panic(err) }
	tmpl := template.Must(template.New("t").Parse(os.Args[1]))
	if err := tmpl.Execute(os.Stdout, data); err != nil { panic(err) }
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain (text/template, as Ollama uses)")
def test_go_template_renders_like_the_hf_template(tiny_llama_dir, tmp_path):
    """Run the TEMPLATE through Go's text/template (Ollama's engine) and compare with the Jinja rendering."""
    import json

    from transformers import AutoTokenizer

    (tmp_path / "render.go").write_text(GO_RENDER)
    binary = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(binary), str(tmp_path / "render.go")], check=True, cwd=tmp_path,
                   env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                        "GOPATH": str(tmp_path / "gopath")}, timeout=300)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour.\nOne word."}],
    ]
    for chat in chats:
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        got = subprocess.run([str(binary), OLLAMA_CHATML_TEMPLATE], input=json.dumps(chat), capture_output=True,
                             text=True, check=True, timeout=60).stdout
        assert got == want
    # A final assistant message is left open, so the model continues it (Ollama's prefill).
    prefill = chats[1][:3]
    got = subprocess.run([str(binary), OLLAMA_CHATML_TEMPLATE], input=json.dumps(prefill), capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert got == tokenizer.apply_chat_template(prefill, tokenize=False).removesuffix("<|im_end|>\n")
