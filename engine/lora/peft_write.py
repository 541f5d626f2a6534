"""LoRA adapters written in exactly the layout PEFT writes (reading them back is engine.lora.peft_read's).

Files: adapter_model.safetensors (PEFT names, A [r, in], B [out, r], float32, metadata {"format": "pt"}),
adapter_config.json (the full field set PEFT 0.21.2 writes) and README.md (a model card).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.atomic import atomic_write_bytes, write_bytes_synced
from engine.lora.config import LoraConfig
from engine.lora.peft_read import ADAPTER_CONFIG as CONFIG_NAME, ADAPTER_WEIGHTS as WEIGHTS_NAME

CARD_NAME = "README.md"
PEFT_FORMAT_VERSION = "0.21.2"   # the PEFT release whose adapter_config.json field set we write


def check_finite(state: dict[str, np.ndarray]) -> None:
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save an adapter with non-finite values in {len(bad)} tensor(s), "
                         f"e.g. {bad[0]}")


def peft_config(lora: LoraConfig, base_model: str) -> dict:
    """adapter_config.json as PEFT 0.21.2's save_pretrained writes it (same keys, sorted)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False,
        "lora_dropout": lora.dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": lora.rank, "rank_pattern": {},
        "revision": None, "target_modules": list(lora.targets), "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": lora.use_rslora, "velora_config": None,
    }
    return dict(sorted(config.items()))


def model_card(lora: LoraConfig, base_model: str, summary: dict | None) -> str:
    """A README in PEFT's front-matter convention plus what this adapter is and how it was trained."""
    lines = ["---", f"base_model: {base_model}", "library_name: peft", "pipeline_tag: text-generation", "tags:",
             f"- base_model:adapter:{base_model}", "- lora", "- transformers", "- lora-lab", "---", "",
             f"# LoRA adapter for {base_model}", "",
             "Trained with LoRA-Lab. Load it with PEFT:", "", "```python",
             "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
             f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
             "model = PeftModel.from_pretrained(base, 'path/to/this/folder')", "```", "",
             "## Adapter", "",
             f"- rank r: {lora.rank}, lora_alpha: {lora.alpha:g}, scaling: {lora.scaling:g}"
             f"{' (rsLoRA)' if lora.use_rslora else ''}",
             f"- target modules: {', '.join(lora.targets)}", f"- lora_dropout: {lora.dropout:g}", ""]
    if summary:
        lines += ["## Training", ""]
        lines += [f"- {key}: {_card_value(value)}" for key, value in summary.items()]
        lines.append("")
    return "\n".join(lines)


def _card_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _adapter_files(state: dict[str, np.ndarray], lora: LoraConfig, base_model: str,
                   summary: dict | None) -> dict[str, bytes]:
    from safetensors.numpy import save

    check_finite(state)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return {
        WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(peft_config(lora, base_model), indent=2) + "\n").encode(),
        CARD_NAME: model_card(lora, base_model, summary).encode(),
    }


def export_adapter(folder: str | Path, state: dict[str, np.ndarray], lora: LoraConfig, base_model: str,
                   summary: dict | None = None) -> Path:
    """Write a PEFT adapter into `folder` (which may hold other things, e.g. checkpoints/), each file replaced
    atomically; weights first and config after, so a config never names weights that are not there yet."""
    folder = Path(folder)
    for name, data in _adapter_files(state, lora, base_model, summary).items():
        atomic_write_bytes(folder / name, data)
    return folder


def write_adapter_files(folder: Path, state: dict[str, np.ndarray], lora: LoraConfig, base_model: str,
                        summary: dict | None = None) -> list[str]:
    """Write the adapter into a folder nobody reads yet (a checkpoint being built); files fsynced."""
    files = _adapter_files(state, lora, base_model, summary)
    for name, data in files.items():
        write_bytes_synced(folder / name, data)
    return list(files)
