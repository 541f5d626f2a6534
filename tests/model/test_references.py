"""Issue 2: the demo model, model references, hardware report, CLI and launcher."""
import json
import subprocess
import sys

import pytest

from engine.cli import main as cli
from engine.model.references import pull_demo, resolve_model


@pytest.mark.slow
def test_demo_model_answers_paris():
    """The pulled SmolLM2 folder holds config, tokenizer and chat template, and its weights are the Q4_1 GGUF
    beside it (no dequantized copy); loaded from there in bfloat16, it answers correctly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model.references import demo_gguf_path
    from engine.model.weights import from_pretrained_args, gguf_of

    folder = pull_demo()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "lora-lab-source.json"} <= names
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".gguf"))]
    assert gguf_of(folder) == demo_gguf_path()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source, gguf = from_pretrained_args(folder)
    model = AutoModelForCausalLM.from_pretrained(source, **gguf, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    assert resolve_model("demo") == folder


def test_resolve_model_kinds(tiny_llama_dir, tmp_path):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir.resolve()
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="neither"):
        resolve_model(str(tmp_path))
    with pytest.raises(ConnectionError, match="not reachable|cannot download"):
        resolve_model("no-such-org/no-such-model-lora-lab")


@pytest.mark.slow
def test_gguf_reference_converts_once_into_cache(tmp_path, monkeypatch):
    """A .gguf path is converted once into the cache and equals the demo folder converted the same way."""
    from engine.model.references import demo_gguf_path

    demo = pull_demo()
    gguf = tmp_path / "copy.gguf"
    gguf.symlink_to(demo_gguf_path())
    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "home"))
    folder = resolve_model(str(gguf))
    assert folder.parent == tmp_path / "home" / "models"
    configs = [json.loads((f / "config.json").read_text()) for f in (folder, demo)]
    for config in configs:
        config.pop("_name_or_path", None)
    assert configs[0] == configs[1] and configs[0]["model_type"] == "llama"
    assert resolve_model(str(gguf)) == folder   # cached: the marker file says the conversion completed
    assert (folder / "lora-lab-source.json").is_file() and not list(folder.glob("*.safetensors"))


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    from bench.gguf_base import write_gguf_base
    from bench.tiny_models import make_model

    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "home"))
    make_model("llama", tmp_path / "hf", hidden_size=96, intermediate_size=160)
    return write_gguf_base(tmp_path / "hf", tmp_path / "tiny.gguf", ("q8_0",))


def test_a_moved_or_changed_gguf_is_never_read_through_a_stale_folder(tiny_gguf, tmp_path):
    import os

    from engine.model.weights import gguf_of

    folder = resolve_model(str(tiny_gguf))
    assert gguf_of(folder) == tiny_gguf.resolve() and not list(folder.glob("*.safetensors"))
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # replaced by another file
    with pytest.raises(ValueError, match="changed since this folder was made"):
        gguf_of(folder)
    again = resolve_model(str(tiny_gguf))
    assert again != folder and gguf_of(again) == tiny_gguf.resolve()   # the new file gets its own folder
    moved = tiny_gguf.rename(tmp_path / "moved.gguf")
    with pytest.raises(FileNotFoundError, match="which is gone; pass the .gguf"):
        gguf_of(again)
    assert gguf_of(resolve_model(str(moved))) == moved.resolve()


def test_the_f32_copy_an_earlier_version_made_is_removed_when_resolved_again(tiny_gguf):
    from engine.model.weights import gguf_of

    folder = resolve_model(str(tiny_gguf))
    stale = folder / "model.safetensors"
    stale.write_bytes(b"x" * 3 * 2**20)   # what earlier versions left: the GGUF dequantized to float32
    assert gguf_of(folder) is None           # while it is there, the folder reads as an ordinary HF folder
    lines = []
    assert resolve_model(str(tiny_gguf), log=lines.append) == folder
    assert not stale.exists() and gguf_of(folder) == tiny_gguf.resolve()
    assert lines == [f"removed {stale} (3 MiB): the float32 copy an earlier version made of tiny.gguf, whose "
                     "weights are now read from the GGUF file itself"]


def test_hw_json_lists_adapters(capsys):
    assert cli(["hw", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu_cores_logical"] >= 1 and report["ram_bytes"] > 2**28
    vulkan = [a for a in report["adapters"] if a["backend"] == "Vulkan"]
    assert vulkan, "lavapipe (or a GPU) should give a Vulkan adapter"
    adapter = vulkan[0]
    assert adapter["limits"]["max-storage-buffer-binding-size"] > 0
    assert "max-compute-workgroup-storage-size" in adapter["limits"]
    if adapter["software"]:
        assert adapter["memory_bytes"] is None   # unknown, never invented


def test_cli_bad_input_is_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "engine", "models", "resolve", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lora-lab models: error:") and "Traceback" not in done.stderr


def test_install_desktop_writes_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert cli(["install-desktop", "--dir", str(tmp_path / "apps")]) == 0
    entry = (tmp_path / "apps" / "lora-lab.desktop").read_text()
    assert "Exec=" in entry and " -m app" in entry
    icon = next(line.split("=", 1)[1] for line in entry.splitlines() if line.startswith("Icon="))
    assert icon.endswith(".svg") and (tmp_path / "data").exists()
