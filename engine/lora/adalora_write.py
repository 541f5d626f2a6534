"""AdaLoRA adapters written as PEFT 0.21.2's AdaLoraModel.save_pretrained writes them, so that
PeftModel.from_pretrained loads them: tensors lora_A [r, in], lora_E [r, 1], lora_B [out, r] (no ".weight"),
truncated to the kept triplets once a rank pattern exists, and the pattern itself in adapter_config.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.atomic import atomic_write_bytes
from engine.lora import adalora, peft_write
from engine.lora.peft_read import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from engine.model.hf_names import module_path


def adalora_tensors(params: adalora.AdaLoraParams, kept: np.ndarray | None) -> dict[str, np.ndarray]:
    """PEFT's saved tensors: every module's A, E, B, keeping only the triplets of `kept` [modules, init_r]
    (None: no pattern yet, everything kept)."""
    out = {}
    for i, m in enumerate(params.modules):
        keep = slice(None) if kept is None else kept[i]
        out[adalora.adalora_key(m.layer, m.target, "A")] = np.ascontiguousarray(params.A[i][keep])
        out[adalora.adalora_key(m.layer, m.target, "E")] = np.ascontiguousarray(params.E[i][keep])
        out[adalora.adalora_key(m.layer, m.target, "B")] = np.ascontiguousarray(params.B[i][:, keep])
    return out


def adalora_config(settings: adalora.AdaLoraSettings, lora_alpha: float, targets: tuple[str, ...],
                   base_model: str, rank_pattern: dict[str, list[bool]] | None) -> dict:
    """adapter_config.json as save_pretrained writes an AdaLoraConfig (same keys, sorted). `r` is LoraConfig's
    default 8, which AdaLoRA ignores (init_r is the rank)."""
    alpha = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha
    config = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "beta1": settings.beta1, "beta2": settings.beta2, "bias": "none",
        "corda_config": None, "deltaT": settings.deltaT, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "init_r": settings.init_r, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False,
        "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "orth_reg_weight": settings.orth_reg_weight,
        "peft_type": "ADALORA", "peft_version": peft_write.PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": 8,
        "rank_pattern": rank_pattern, "revision": None, "target_modules": list(targets), "target_parameters": None,
        "target_r": settings.target_r, "task_type": "CAUSAL_LM", "tfinal": settings.tfinal, "tinit": settings.tinit,
        "total_step": settings.total_step, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None,
    }
    return dict(sorted(config.items()))


def adalora_card(settings: adalora.AdaLoraSettings, lora_alpha: float, targets: tuple[str, ...],
                 base_model: str, ranks: dict[str, int], summary: dict | None) -> str:
    lines = ["---", f"base_model: {base_model}", "library_name: peft", "pipeline_tag: text-generation", "tags:",
             f"- base_model:adapter:{base_model}", "- adalora", "- transformers", "- lora-lab", "---", "",
             f"# AdaLoRA adapter for {base_model}", "",
             "Trained with LoRA-Lab. Load it with PEFT's `PeftModel.from_pretrained(base, 'path/to/this/folder')`.",
             "", "## Adapter", "",
             f"- init_r {settings.init_r} -> target_r {settings.target_r} on average, lora_alpha {lora_alpha:g}",
             (f"- schedule: tinit {settings.tinit}, tfinal {settings.tfinal}, deltaT {settings.deltaT}, "
              f"total_step {settings.total_step}; beta1 {settings.beta1:g}, beta2 {settings.beta2:g}, "
              f"orth_reg_weight {settings.orth_reg_weight:g}"),
             f"- target modules: {', '.join(targets)}", "", "## Final ranks", ""]
    lines += [f"- {name}: {rank}" for name, rank in ranks.items()]
    lines.append("")
    if summary:
        lines += ["## Training", ""]
        lines += [f"- {key}: {value}" for key, value in summary.items()]
        lines.append("")
    return "\n".join(lines)


def export_adalora_adapter(folder: str | Path, params: adalora.AdaLoraParams, kept: np.ndarray | None,
                           settings: adalora.AdaLoraSettings, lora_alpha: float, targets: tuple[str, ...],
                           base_model: str, summary: dict | None = None) -> Path:
    """Write the AdaLoRA adapter into `folder`, each file replaced atomically, weights first. `kept` [modules,
    init_r] is the rank pattern (None before the first masking: PEFT then saves everything, rank_pattern null)."""
    from safetensors.numpy import save

    folder = Path(folder)
    tensors = adalora_tensors(params, kept)
    peft_write.check_finite(tensors)
    pattern = None if kept is None else {adalora.rank_pattern_key(m.layer, m.target): [bool(k) for k in row]
                                         for m, row in zip(params.modules, kept)}
    kept_ranks = np.full(len(params.modules), params.init_r) if kept is None else kept.sum(axis=1)
    ranks = {module_path(m.layer, m.target): int(r) for m, r in zip(params.modules, kept_ranks)}
    files = {
        ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"}),
        ADAPTER_CONFIG: (json.dumps(adalora_config(settings, lora_alpha, targets, base_model, pattern), indent=2)
                         + "\n").encode(),
        peft_write.CARD_NAME: adalora_card(settings, lora_alpha, targets, base_model, ranks, summary).encode(),
    }
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return folder


FOLDED_DIR = "lora-rank-pattern"   # beside a run's AdaLoRA adapter: the plain per-module-rank LoRA it folds into


def plain_lora_folder(folder: str | Path) -> Path:
    """The folder to export or evaluate for `folder`: an adaptive-rank run's AdaLoRA adapter is read through the
    plain LoRA its kept triplets fold into (FOLDED_DIR, written beside it by the run); any other folder as is."""
    folder = Path(folder)
    folded = folder / FOLDED_DIR
    try:
        peft_type = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return folder           # the reader that comes next says what is wrong with it
    return folded if peft_type == "ADALORA" and (folded / ADAPTER_CONFIG).is_file() else folder
