"""Issue 22: Ctrl-C at start-up, malformed adapter configs, bad --val-data, NaN in --json output and OS errors
without a path all end in one line (or valid JSON), never a traceback."""
from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import engine.cli
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The quick brown fox jumps over the lazy dog. " * 30


def _one_line(capsys, command: str, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("lora-lab")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"lora-lab {command}: error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def test_ctrl_c_while_the_command_modules_load_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.cli, "build_parser", interrupted)
    assert main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "lora-lab: interrupted\n"


def test_ctrl_c_at_start_up_in_a_real_process(tmp_path):
    """SIGINT a fresh `python -m engine` at several moments of its start-up: never a traceback."""
    for delay in (0.3, 0.8, 1.5):
        child = subprocess.Popen([sys.executable, "-m", "engine", "models", "resolve", str(tmp_path / "nothing")],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (delay, err)
        assert child.returncode in (130, 2, -signal.SIGINT), (delay, child.returncode, err)


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    from bench.peft_adapters import make_adapter

    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("a") / "adapter", target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("edit, words", [
    ({"lora_alpha": None}, "lora_alpha is None"),
    ({"rank_pattern": "x"}, "rank_pattern is 'x'"),
    ({"r": "4"}, "r is '4'"),
    ({"target_modules": 7}, "target_modules is 7"),
    ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
    ({"target_modules": ["q_proj"]}, "does not include v_proj"),      # PEFT would apply q_proj only
    (None, "not a PEFT"),                                              # {} in place of the config
])
def test_malformed_adapter_configs_are_one_line_in_export_and_chat(tiny_llama_dir, adapter, tmp_path, capsys,
                                                                   edit, words):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit} if edit else {}))
    if edit is None:
        words = "r is None"      # {}: no default is guessed for r or lora_alpha
    for argv in (["export", "--model", str(tiny_llama_dir), "--adapter", str(folder), "--to", "merged",
                  "--out", str(tmp_path / "out")],
                 ["export", "--model", str(tiny_llama_dir), "--adapter", str(folder), "--to", "gguf",
                  "--out", str(tmp_path / "out")],
                 ["chat", "--model", str(tiny_llama_dir), "--adapter", str(folder), "--prompt", "hi", "--device",
                  "cpu", "--max-new-tokens", "2"]):
        if argv[0] == "chat" and "does not include" in words:
            continue      # chat runs PEFT itself, which applies q_proj only: the exports must agree with it
        _one_line(capsys, argv[0], main(argv), words)
        assert not (tmp_path / "out").exists()


def test_chat_refuses_weights_of_another_model_than_its_config(tiny_llama_dir, tmp_path, capsys):
    """transformers filled the missing layers randomly and answered."""
    folder = tmp_path / "four-layers"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = config["num_hidden_layers"] + 2
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["chat", "--model", str(folder), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"])
    _one_line(capsys, "chat", code, str(folder), "do not match config.json", "missing")


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02\xff\xfe" * 50])
def test_a_bad_val_data_file_is_reported_not_dropped(tiny_llama_dir, tmp_path, capsys, content):
    data, val = tmp_path / "train.txt", tmp_path / "val.txt"
    data.write_text(TEXT)
    val.write_bytes(content)
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--val-data", str(val),
                 "--out", str(tmp_path / "out"), "--steps", "1", "--seq-len", "16", "--backend", "cpu"])
    _one_line(capsys, "train", code, "no usable validation data", str(val))
    assert not (tmp_path / "out").exists()


def test_eval_json_writes_null_for_a_non_finite_loss(tiny_llama_dir, adapter, tmp_path, capsys):
    """An adapter with huge (finite) weights overflows the forward: NaN is not JSON, null is."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "huge"
    shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: (v * np.float32(1e30) if "lora_B" in k else v) for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    (tmp_path / "d.txt").write_text(TEXT)
    assert main(["eval", "--model", str(tiny_llama_dir), "--adapter", str(folder), "--data", str(tmp_path / "d.txt"),
                 "--seq-len", "16", "--backend", "cpu", "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"{name} in --json output: {out}")

    result = json.loads(out, parse_constant=refuse)
    assert result["loss"] is None and result["perplexity"] is None and result["tokens"] > 0


def test_a_file_size_limit_names_the_file(tmp_path, monkeypatch, capsys):
    """Under `ulimit -f` a write fails with EFBIG, whose message names no file."""
    import engine.atomic

    real_open = open

    def limited(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith("trainer_state.json"):
            handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.EFBIG, "File too large"))
        return handle

    monkeypatch.setattr("builtins.open", limited)
    with pytest.raises(OSError, match=r"file size limit reached while writing .*trainer_state\.json"):
        engine.atomic.write_bytes_synced(tmp_path / "trainer_state.json", b"{}")


@pytest.mark.parametrize("edit, words", [
    ({"hidden_size": 48}, "the weights do not match config.json"),
    ({"vocab_size": 500}, "model.embed_tokens.weight is"),
    ({"num_hidden_layers": 4}, "missing (e.g. model.layers.2."),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"hidden_size": "64"}, "hidden_size is '64'"),
])
def test_a_config_that_does_not_fit_its_weights_is_one_line(tiny_llama_dir, tmp_path, capsys, edit, words):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    for argv in (["eval", "--model", str(folder), "--data", str(data), "--seq-len", "16", "--backend", "cpu"],
                 ["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "out"), "--steps",
                  "1", "--seq-len", "16", "--backend", "cpu"]):
        _one_line(capsys, argv[0], main(argv), str(folder), words)
        assert not (tmp_path / "out").exists()
