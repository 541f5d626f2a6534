"""Merged export: logits equal PEFT's base + adapter, base dtype kept, tied head not duplicated, no peft needed."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest

from engine.atomic import DiskFullError
from engine.export.merged import export_merged
from bench.peft_adapters import PROBE_TOKENS, load_base, make_adapter, make_mistral, peft_logits


@pytest.mark.parametrize("config", [dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=4, use_rslora=True)],
                         ids=["plain", "rslora"])
def test_merged_logits_equal_peft(tiny_model_dir, tmp_path, config):
    _check_merged_logits(tiny_model_dir, tmp_path, config)


def test_merged_mistral_logits_equal_peft(tmp_path):
    _check_merged_logits(make_mistral(tmp_path / "mistral"), tmp_path, dict(r=4, lora_alpha=8))


def _check_merged_logits(tiny_model_dir, tmp_path, config):
    import torch

    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=5, **config)
    result = export_merged(adapter_dir, tiny_model_dir, tmp_path / "merged")
    assert result.n_merged == 7 * 2
    merged = load_base(result.path)
    with torch.no_grad():
        got = merged(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    want = peft_logits(tiny_model_dir, adapter_dir)
    base = peft_logits(tiny_model_dir, None)
    assert np.abs(want - base).max() > 0.1  # the adapter really moves the logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_merged_folder_is_a_complete_plain_model(tiny_model_dirs, tmp_path):
    from safetensors import safe_open

    base_dir = tiny_model_dirs["llama"]  # tied embeddings
    adapter_dir = make_adapter(base_dir, tmp_path / "adapter")
    out = export_merged(adapter_dir, base_dir, tmp_path / "merged").path
    base_files = {p.name for p in base_dir.iterdir()}
    assert {p.name for p in out.iterdir()} == base_files
    assert json.loads((out / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as merged, safe_open(base_dir / "model.safetensors", "pt") as base:
        assert set(merged.keys()) == set(base.keys()) and "lm_head.weight" not in merged.keys()
        assert merged.metadata()["format"] == "pt"
        for key in base.keys():
            same = bool((merged.get_tensor(key) == base.get_tensor(key)).all())
            assert same == ("_proj." not in key), key  # only the adapted projections change


def test_merged_loads_without_peft(tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["qwen2"]
    out = export_merged(make_adapter(base_dir, tmp_path / "adapter"), base_dir, tmp_path / "merged").path
    code = (
        "import importlib.util, sys\n"
        "sys.modules['peft'] = None  # as if not installed: find_spec says None, import raises\n"
        "assert importlib.util.find_spec('peft') is None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "Qwen2ForCausalLM"


def test_bf16_base_stays_bf16(tiny_model_dirs, tmp_path):
    import torch

    base_dir = tmp_path / "base-bf16"
    load_base(tiny_model_dirs["qwen3"]).to(torch.bfloat16).save_pretrained(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base_dir / name).write_bytes((tiny_model_dirs["qwen3"] / name).read_bytes())
    adapter_dir = make_adapter(tiny_model_dirs["qwen3"], tmp_path / "adapter")
    out = export_merged(adapter_dir, base_dir, tmp_path / "merged").path
    merged = load_base(out, dtype=torch.bfloat16)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # The merged weight is W + scale * B @ A rounded once to bf16.
    from engine.lora.peft_read import read_adapter

    mod = read_adapter(adapter_dir).modules[0]
    base_w = load_base(base_dir, dtype=torch.bfloat16).get_submodule(mod.name).weight.float()
    want = (base_w + torch.from_numpy(mod.delta())).to(torch.bfloat16)
    assert torch.equal(merged.get_submodule(mod.name).weight, want)


def test_sharded_base_keeps_its_shards(tiny_model_dirs, tmp_path):
    import torch

    base_dir = tmp_path / "base-sharded"
    load_base(tiny_model_dirs["qwen2"]).save_pretrained(base_dir, max_shard_size="200KB")
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(shards) > 1
    adapter_dir = make_adapter(tiny_model_dirs["qwen2"], tmp_path / "adapter", seed=2)
    result = export_merged(adapter_dir, base_dir, tmp_path / "merged")
    assert sorted(result.shards) == shards and (result.path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        got = load_base(result.path)(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, peft_logits(tiny_model_dirs["qwen2"], adapter_dir), atol=1e-4, rtol=0)


def test_existing_output_is_kept_unless_forced(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export_merged(adapter_dir, tiny_llama_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_merged(adapter_dir, tiny_llama_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_disk_leaves_previous_export_and_no_temp(tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    out = export_merged(adapter_dir, tiny_llama_dir, tmp_path / "merged").path
    before = (out / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(DiskFullError, match="disk full while writing"):
        export_merged(adapter_dir, tiny_llama_dir, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dora_is_refused(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        export_merged(adapter_dir, tiny_llama_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_conversion_marker_is_not_copied(tiny_llama_dir, tmp_path):
    """A base converted from a GGUF carries engine.model.references' marker; the merged model is no longer that GGUF."""
    import shutil

    from engine.model.references import COMPLETE_MARKER

    base_dir = tmp_path / "converted"
    shutil.copytree(tiny_llama_dir, base_dir)
    (base_dir / COMPLETE_MARKER).write_text(json.dumps({"gguf": "/models/base.gguf", "converted_by": "lora-lab"}))
    out = export_merged(make_adapter(base_dir, tmp_path / "adapter"), base_dir, tmp_path / "merged").path
    assert not (out / COMPLETE_MARKER).exists() and (out / "config.json").is_file()


def test_base_without_safetensors_is_refused(tiny_llama_dir, tmp_path):
    import shutil

    base_dir = tmp_path / "bin-base"
    shutil.copytree(tiny_llama_dir, base_dir)
    (base_dir / "model.safetensors").rename(base_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="merging needs safetensors weights"):
        export_merged(make_adapter(tiny_llama_dir, tmp_path / "adapter"), base_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_overflowing_the_base_dtype_is_refused(tiny_model_dirs, tmp_path):
    import torch

    base_dir = tmp_path / "base-f16"
    load_base(tiny_model_dirs["qwen2"]).to(torch.float16).save_pretrained(base_dir)
    adapter_dir = make_adapter(tiny_model_dirs["qwen2"], tmp_path / "adapter", b_std=1e5)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        export_merged(adapter_dir, base_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_into_a_gguf_only_base_dequantizes_it_to_bf16(tmp_path, monkeypatch):
    """A base that exists only as GGUF (q4_1/q8_0 blocks): every merged tensor is transformers' own dequantization
    of the file plus PEFT's update, stored as bfloat16 (within one bf16 rounding of it)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bench.gguf_base import write_gguf_base
    from bench.tiny_models import make_model
    from engine.model.references import COMPLETE_MARKER, resolve_model

    monkeypatch.setenv("LORA_LAB_HOME", str(tmp_path / "home"))
    make_model("llama", tmp_path / "hf", hidden_size=96, intermediate_size=160)
    gguf = write_gguf_base(tmp_path / "hf", tmp_path / "base.gguf", ("q4_1", "q8_0"))
    base_dir = resolve_model(str(gguf))
    adapter_dir = make_adapter(tmp_path / "hf", tmp_path / "adapter", seed=5)
    result = export_merged(adapter_dir, base_dir, tmp_path / "merged")
    assert result.n_merged == 7 * 2 and result.dtype == "bfloat16"
    assert result.dequantized_from == "Q4_1, Q8_0"   # 8 of the 15 2-D weights are q4_1
    out = result.path
    assert {p.name for p in out.iterdir()} == {p.name for p in base_dir.iterdir()} - {COMPLETE_MARKER} | {
        "model.safetensors"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    want = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want) - {"lm_head.weight"}   # tied: stored once
    for key, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, key
        torch.testing.assert_close(tensor.float(), want[key], rtol=2 ** -8, atol=0, msg=key)
    merged_model = load_base(out)
    assert merged_model.config.tie_word_embeddings and merged_model.dtype == torch.float32
