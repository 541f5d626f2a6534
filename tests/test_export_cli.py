"""`lora-lab export` end to end: both targets, what it prints, and refusals as one-line errors (exit 2)."""
from __future__ import annotations

import pytest

from engine.cli import main
from tests.peft_adapters import make_adapter


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("cli") / "my-adapter")


def test_export_gguf_writes_adapter_modelfile_and_note(tiny_llama_dir, adapter_dir, tmp_path, capsys):
    import gguf

    out = tmp_path / "export"
    argv = ["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir), "--to", "gguf", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README-llama.cpp-ollama.md", "my-adapter.gguf"]
    assert "28 tensors, f16, arch llama" in printed and "Q/K row permutation to 4 lora_b tensors" in printed
    assert gguf.GGUFReader(out / "my-adapter.gguf").fields["general.type"].contents() == "adapter"
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM {tiny_llama_dir.resolve()}" in modelfile and "ADAPTER ./my-adapter.gguf" in modelfile
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--force", "--gguf-dtype", "f32"]) == 0
    assert "f32" in capsys.readouterr().out


def test_export_to_named_gguf_file(tiny_llama_dir, adapter_dir, tmp_path):
    target = tmp_path / "out" / "tuned.gguf"
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir), "--to", "gguf",
                 "--out", str(target)]) == 0
    assert target.is_file() and "ADAPTER ./tuned.gguf" in (target.parent / "Modelfile").read_text()


def test_export_merged(tiny_llama_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir), "--to", "merged",
                 "--out", str(out)]) == 0
    assert "merged 14 LoRA weights" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_dora_is_refused_with_one_line(tiny_llama_dir, tmp_path, capsys):
    dora = make_adapter(tiny_llama_dir, tmp_path / "dora", use_dora=True)
    capsys.readouterr()  # drop transformers' progress output from making the adapter
    code = main(["export", "--model", str(tiny_llama_dir), "--adapter", str(dora), "--to", "gguf",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lora-lab export: error: cannot export") and "DoRA" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_adapter_folder(tiny_llama_dir, tmp_path, capsys):
    code = main(["export", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "nope"), "--to", "merged",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "adapter folder" in capsys.readouterr().err
