"""`lora-lab export` end to end: both targets, what it prints, and refusals as one-line errors (exit 2)."""
from __future__ import annotations

import pytest

from engine.cli import main
from bench.peft_adapters import make_adapter


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
    assert "28 tensors, f32, arch llama" in printed and "Q/K row permutation to 4 lora_b tensors" in printed
    assert gguf.GGUFReader(out / "my-adapter.gguf").fields["general.type"].contents() == "adapter"
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM {tiny_llama_dir.resolve()}" in modelfile and "ADAPTER ./my-adapter.gguf" in modelfile
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--force", "--gguf-dtype", "f16"]) == 0
    assert "28 tensors, f16" in capsys.readouterr().out


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


def test_gguf_base_is_named_in_modelfile_and_note(tiny_llama_dir, adapter_dir, tmp_path, monkeypatch):
    """--model base.gguf: engine.model.references converts it for reading; the Modelfile and the note name the GGUF."""
    from bench.gguf_base import write_gguf_base

    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "home"))
    base_gguf = write_gguf_base(tiny_llama_dir, tmp_path / "tiny-base.gguf")
    out = tmp_path / "export"
    assert main(["export", "--model", str(base_gguf), "--adapter", str(adapter_dir), "--to", "gguf",
                 "--out", str(out)]) == 0
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM {base_gguf.resolve()}\n" in modelfile and "needs the base model as GGUF" not in modelfile
    note = (out / "README-llama.cpp-ollama.md").read_text()
    assert f"llama-cli -m {base_gguf.resolve()} --lora my-adapter.gguf" in note
    # A folder converted from that GGUF names it too (as the demo model's folder does).
    converted = next((tmp_path / "home" / "models").iterdir())
    assert main(["export", "--model", str(converted), "--adapter", str(adapter_dir), "--to", "gguf",
                 "--out", str(tmp_path / "export2")]) == 0
    assert f"FROM {base_gguf.resolve()}\n" in (tmp_path / "export2" / "Modelfile").read_text()


def test_demo_style_marker_names_the_gguf_beside_the_folder(tiny_llama_dir, tmp_path):
    """The demo's marker names its GGUF by file name only; it lies beside the converted folder."""
    import json
    import shutil

    from engine.model.references import resolve_for_gguf as resolve_base
    from engine.model.references import COMPLETE_MARKER

    folder = tmp_path / "models" / "Tiny-Instruct"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"gguf": "Tiny-Instruct.Q4_1.gguf", "hub_id": "org/tiny"}))
    assert resolve_base(str(folder)) == (folder.resolve(), str(folder.resolve()))  # GGUF not there (yet)
    (tmp_path / "models" / "Tiny-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_base(str(folder)) == (folder.resolve(), str((tmp_path / "models" / "Tiny-Instruct.Q4_1.gguf")
                                                                .resolve()))


def test_second_adapter_into_the_same_folder_needs_force(tiny_llama_dir, adapter_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "export"
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter_dir), "--to", "gguf",
                 "--out", str(out)]) == 0
    other = tmp_path / "other-adapter"
    shutil.copytree(adapter_dir, other)
    capsys.readouterr()
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(other), "--to", "gguf",
                 "--out", str(out)]) == 2
    assert "Modelfile already exists" in capsys.readouterr().err
    assert not (out / "other-adapter.gguf").exists() and "my-adapter.gguf" in (out / "Modelfile").read_text()


def test_merged_export_of_a_gguf_base_says_it_was_dequantized(tmp_path, monkeypatch, capsys):
    from bench.gguf_base import write_gguf_base
    from bench.tiny_models import make_model

    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "home"))
    make_model("llama", tmp_path / "hf", hidden_size=96, intermediate_size=160)
    base_gguf = write_gguf_base(tmp_path / "hf", tmp_path / "tiny.Q8_0.gguf", ("q8_0",))
    adapter = make_adapter(tmp_path / "hf", tmp_path / "adapter")
    assert main(["export", "--model", str(base_gguf), "--adapter", str(adapter), "--to", "merged",
                 "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "the base was only available as GGUF (Q8_0): the merged weights are dequantized from it and stored " \
           "as bfloat16" in out
    assert (tmp_path / "merged" / "model.safetensors").is_file()
