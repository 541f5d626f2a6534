"""Issue 2: the demo model, model references, hardware report, CLI and launcher."""
import json
import subprocess
import sys

import pytest

from engine.cli import main as cli
from engine.model.references import pull_demo, resolve_model


@pytest.mark.slow
def test_demo_model_answers_paris():
    """The pulled SmolLM2 folder is an ordinary HF folder whose chat template and weights answer correctly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pull_demo()
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
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
    assert (folder / "lora-lab-source.json").is_file()


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
