"""The Ollama Modelfile and the how-to note written beside an exported GGUF adapter.

Ollama templates are Go templates, HF chat templates are Jinja: they cannot be translated in general. We
recognise the one family our models use, ChatML (`<|im_start|>role\\n…<|im_end|>\\n`, SmolLM2 and Qwen), by
*rendering* the base's Jinja template on probe conversations and comparing the text with ChatML exactly — a
template that renders anything else is reported as not converted in the note, never guessed. A default system
prompt the template injects when none is given (SmolLM2 and Qwen2.5 do) becomes the Modelfile's SYSTEM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.atomic import write_text_atomic

# ChatML as an Ollama Go template: every message framed by <|im_start|>/<|im_end|>; after a final non-assistant
# message the assistant turn is opened (add_generation_prompt); a final assistant message is left open so the
# model continues it, as Ollama's own ChatML templates do.
OLLAMA_CHATML_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ else if ne .Role "assistant" }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}"""

CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
MODELFILE, NOTE = "Modelfile", "README-llama.cpp-ollama.md"

_PROBE_SYSTEM, _PROBE_USER_1 = "probe-system-7f3a", "probe-user-1-7f3a"
_PROBE_ASSISTANT, _PROBE_USER_2 = "probe-assistant-7f3a", "probe-user-2-7f3a"


@dataclass(frozen=True)
class TemplateConversion:
    template: str | None        # Go template for the Modelfile, None when not converted
    stops: tuple[str, ...]
    default_system: str | None  # the system prompt the HF template adds when the chat has none
    reason: str                 # what was found (shown in the note either way)


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def convert_chat_template(base_dir: Path | str) -> TemplateConversion:
    """Render the base's chat template on probe chats; return the Ollama template when it is exactly ChatML."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        return TemplateConversion(None, (), None, f"the base's tokenizer could not be loaded ({exc})")
    if not getattr(tokenizer, "chat_template", None):
        return TemplateConversion(None, (), None, "the base model has no chat template (a base, not chat, model)")

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    turns = [{"role": "user", "content": _PROBE_USER_1}, {"role": "assistant", "content": _PROBE_ASSISTANT},
             {"role": "user", "content": _PROBE_USER_2}]
    with_system = [{"role": "system", "content": _PROBE_SYSTEM}, *turns]
    try:
        rendered_system, rendered_plain = render(with_system), render(turns)
    except Exception as exc:  # noqa: BLE001 — any Jinja failure means "not convertible", said in the note
        return TemplateConversion(None, (), None, f"the chat template failed to render a probe chat ({exc})")
    if rendered_system != _chatml(with_system):
        return TemplateConversion(None, (), None, "the chat template is not ChatML; it renders a chat as "
                                  f"{rendered_system[:200]!r}")
    if rendered_plain == _chatml(turns):
        return TemplateConversion(OLLAMA_CHATML_TEMPLATE, CHATML_STOPS, None, "ChatML, no default system prompt")
    prefix, body = "<|im_start|>system\n", _chatml(turns)
    if rendered_plain.startswith(prefix) and rendered_plain.endswith("<|im_end|>\n" + body):
        default = rendered_plain[len(prefix):-len("<|im_end|>\n" + body)]
        if "<|im_" not in default:
            return TemplateConversion(OLLAMA_CHATML_TEMPLATE, CHATML_STOPS, default,
                                      "ChatML with a default system prompt")
    return TemplateConversion(None, (), None, "the chat template is ChatML-like but adds text to chats without a"
                              f" system message that is not a plain system prompt: {rendered_plain[:200]!r}")


def ollama_model_name(adapter_dir: Path | str) -> str:
    """A name `ollama create` accepts, from the adapter folder's name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(adapter_dir).resolve().name.lower()).strip("-.")
    return name or "lora-lab-model"


def _go_string(text: str) -> str:
    if '"""' in text:
        raise ValueError("a system prompt containing '\"\"\"' cannot be written in a Modelfile")
    return f'"""{text}"""'


def modelfile_text(base_ref: str, adapter_file: str, conversion: TemplateConversion) -> str:
    lines = ["# Written by LoRA-Lab. Build with: ollama create NAME -f Modelfile"]
    if not base_ref.lower().endswith(".gguf"):
        lines.append("# Ollama needs the base model as GGUF (or a safetensors folder `ollama create` can import):"
                     " point FROM at the .gguf of exactly this base model.")
    lines += [f"FROM {base_ref}", f"ADAPTER {adapter_file}"]
    if conversion.template is not None:
        lines.append(f'TEMPLATE """{conversion.template}"""')
        lines += [f'PARAMETER stop "{s}"' for s in conversion.stops]
    else:
        lines.append("# No TEMPLATE: the base's chat template could not be converted (see the note beside this file).")
    if conversion.default_system is not None:
        lines.append(f"SYSTEM {_go_string(conversion.default_system)}")
    return "\n".join(lines) + "\n"


def note_text(base_ref: str, gguf_name: str, model_name: str, arch: str, alpha: float, r_values: list[int],
              conversion: TemplateConversion) -> str:
    base_gguf = base_ref if base_ref.lower().endswith(".gguf") else "BASE.gguf"
    lines = [
        "# Using this LoRA adapter with llama.cpp and Ollama",
        "",
        f"`{gguf_name}` is a llama.cpp LoRA adapter (architecture `{arch}`, adapter.lora.alpha = {alpha:g},"
        f" rank {', '.join(map(str, sorted(set(r_values))))}). It only works on top of the exact base model it was"
        f" trained from: `{base_ref}`.",
        "",
    ]
    if base_gguf == "BASE.gguf":
        lines += [
            "The base was given as a Hugging Face model, not a GGUF file. llama.cpp and Ollama need the base as GGUF:"
            " convert it once with llama.cpp's `convert_hf_to_gguf.py` (or download the base's official GGUF), then"
            " use that file as BASE.gguf below and in the Modelfile's FROM line. A quantised base (Q8_0, Q4_K_M)"
            " works with the same adapter.",
            "",
        ]
    lines += [
        "## llama.cpp",
        "",
        f"    llama-cli -m {base_gguf} --lora {gguf_name} -cnv",
        f"    llama-server -m {base_gguf} --lora {gguf_name}",
        "",
        f"`--lora-scaled {gguf_name} 0.5` applies the adapter at half strength.",
        "",
        "## Ollama",
        "",
        f"    ollama create {model_name} -f Modelfile",
        f"    ollama run {model_name}",
        "",
        f"Chat template: {conversion.reason}.",
    ]
    if conversion.template is None:
        lines.append("The Modelfile has no TEMPLATE, so Ollama will use the base GGUF's own template (if it has"
                     " one). Check that it matches how the adapter was trained before relying on the chat.")
    else:
        lines.append("The Modelfile's TEMPLATE is ChatML in Ollama's Go syntax (tool calls are not carried over).")
    return "\n".join(lines) + "\n"


def write_ollama_files(out_dir: Path, base_ref: str, base_dir: Path, gguf_path: Path, arch: str, alpha: float,
                       r_values: list[int], adapter_dir: Path) -> tuple[Path, Path, TemplateConversion]:
    """Write MODELFILE and NOTE into `out_dir`; return their paths and the conversion."""
    conversion = convert_chat_template(base_dir)
    adapter_ref = "./" + gguf_path.name if gguf_path.parent.resolve() == out_dir.resolve() else str(gguf_path)
    modelfile, note = out_dir / MODELFILE, out_dir / NOTE
    write_text_atomic(modelfile, modelfile_text(base_ref, adapter_ref, conversion))
    write_text_atomic(note, note_text(base_ref, gguf_path.name, ollama_model_name(adapter_dir), arch, alpha,
                                      r_values, conversion))
    return modelfile, note, conversion
