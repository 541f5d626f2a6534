"""`lora-lab chat`: streams the same answer the engine gives, with the adapter the user named."""
from __future__ import annotations

import io

from engine.cli import main
from engine.chat.generation import GenerationSettings
from engine.chat.inference import ChatEngine
from tests.chat_helpers import make_adapter

GREEDY = ["--temperature", "0", "--max-new-tokens", "12", "--repetition-penalty", "1"]


def _engine_answer(model_dir, adapter_dir, messages):
    chat = ChatEngine(device="cpu")
    chat.load(model_dir)
    if adapter_dir is not None:
        chat.set_active_adapter(chat.load_adapter(adapter_dir))
    settings = GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    answer = "".join(chat.stream_chat(messages, settings))
    chat.unload()
    return answer


def test_chat_answers_with_the_adapter_or_the_base(tiny_llama_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=21)
    messages = [{"role": "user", "content": "Hello world!"}]
    assert main(["chat", "--model", str(tiny_llama_dir), "--prompt", "Hello world!", "--device", "cpu", "--adapter", str(adapter),
                 *GREEDY]) == 0
    out = capsys.readouterr()
    assert out.out == _engine_answer(tiny_llama_dir, adapter, messages) + "\n"
    assert "adapter: adapter" in out.err
    assert main(["chat", "--model", str(tiny_llama_dir), "--prompt", "Hello world!", "--device", "cpu", "--adapter", str(adapter),
                 "--base", *GREEDY]) == 0
    assert capsys.readouterr().out == _engine_answer(tiny_llama_dir, None, messages) + "\n"


def test_chat_keeps_the_history_of_stdin_turns(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world!\n\nHow are you today?\n"))
    assert main(["chat", "--model", str(tiny_llama_dir), "--device", "cpu", "--system", "Be brief.", *GREEDY]) == 0
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    first = _engine_answer(tiny_llama_dir, None, history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you today?"}]
    second = _engine_answer(tiny_llama_dir, None, history)
    assert first != second
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_bad_settings_and_missing_adapter_are_one_line_errors(tiny_llama_dir, tmp_path, capsys):
    assert main(["chat", "--model", str(tiny_llama_dir), "--prompt", "hi", "--device", "cpu", "--temperature", "-1"]) == 2
    assert "temperature=-1.0 is invalid" in capsys.readouterr().err
    assert main(["chat", "--model", str(tiny_llama_dir), "--prompt", "hi", "--device", "cpu", "--adapter", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_the_terminal_stays_clean_of_loading_bars_and_library_warnings(tiny_llama_dir, tmp_path):
    """`lora-lab chat` printed transformers' weight-loading bar and a FutureWarning before the answer."""
    import subprocess
    import sys

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=3)
    run = subprocess.run([sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())", "chat",
                          "--model", str(tiny_llama_dir), "--prompt", "Hi", "--device", "cpu", "--adapter",
                          str(adapter), *GREEDY], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # Only our header line (and, on a machine without a display runtime dir, wgpu's own complaint).
    lines = [line for line in run.stderr.splitlines() if "XDG_RUNTIME_DIR" not in line]
    assert len(lines) == 1 and "adapter: adapter" in lines[0], run.stderr
