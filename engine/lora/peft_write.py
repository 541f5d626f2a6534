"""LoRA adapters written in exactly the layout PEFT writes (reading them back is engine.lora.peft_read's).

Files: adapter_model.safetensors (PEFT names, A [r, in], B [out, r], float32, metadata {"format": "pt"}),
adapter_config.json (the full field set PEFT 0.21.2 writes) and README.md (a model card).

Per-module ranks (an adaptive-rank run's, folded to plain LoRA) are written as PEFT's LoraConfig says them:
`rank_pattern` maps a module's full path (model.layers.3.self_attn.q_proj, which PEFT's get_pattern_key matches
against that module alone) to its rank. PEFT's LoRA refuses r = 0, so a projection pruned to nothing is listed in
`exclude_modules` instead and has no tensors: PEFT then builds no layer there, and the base weight is used as is.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engine.atomic import atomic_write_bytes, write_bytes_synced
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig
from engine.lora.peft_read import ADAPTER_CONFIG as CONFIG_NAME
from engine.lora.peft_read import ADAPTER_WEIGHTS as WEIGHTS_NAME
from engine.model.hf_names import TARGET_ORDER, module_path

CARD_NAME = "README.md"
PEFT_FORMAT_VERSION = "0.21.2"   # the PEFT release whose adapter_config.json field set we write


def check_finite(state: dict[str, np.ndarray]) -> None:
    bad = [k for k, v in state.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save an adapter with non-finite values in {len(bad)} tensor(s), "
                         f"e.g. {bad[0]}")


def rank_pattern_of(rank_map, targets: tuple[str, ...]) -> dict[str, int]:
    """The rank_pattern of a rank map as StepEvent.rank_map carries it ([layer][target], targets in
    TrainConfig.lora.targets order): {model.layers.{i}.self_attn.q_proj: rank, ...}, 0 included."""
    return {module_path(layer, t): int(r) for layer, row in enumerate(rank_map) for t, r in zip(targets, row,
                                                                                                strict=True)}


def check_rank_pattern(state: Mapping[str, np.ndarray], lora: LoraConfig, rank_pattern: Mapping[str, int]) -> None:
    """Refuse a rank_pattern that does not describe `state`: keys are module paths of lora.targets, ranks are
    whole numbers >= 0, each adapted module's lora_A has its rank's rows and a rank-0 module has no tensors."""
    for name, rank in rank_pattern.items():
        parts = name.split(".")
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() \
                or parts[4] not in lora.targets or module_path(int(parts[2]), parts[4]) != name:
            raise ValueError(f"rank_pattern key {name!r} is not a module path like model.layers.0.self_attn.q_proj "
                             f"of a targeted projection ({', '.join(lora.targets)})")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
            raise ValueError(f"rank_pattern gives {name} rank {rank!r}; expected a whole number >= 0")
        a = state.get(f"base_model.model.{name}.lora_A.weight")
        got = 0 if a is None else a.shape[0]
        if got != rank:
            raise ValueError(f"rank_pattern gives {name} rank {rank} but its lora_A has {got} rows"
                             + ("; a projection pruned to rank 0 is written without tensors" if rank == 0 else ""))
    for key, value in state.items():
        name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if key.endswith("lora_A.weight") and name not in rank_pattern and value.shape[0] != lora.rank:
            raise ValueError(f"{name} has rank {value.shape[0]}, neither lora.rank {lora.rank} nor in rank_pattern")


def peft_config(lora: LoraConfig, base_model: str, rank_pattern: Mapping[str, int] | None = None) -> dict:
    """adapter_config.json as PEFT 0.21.2's save_pretrained writes it (same keys, sorted). `rank_pattern`: module
    path -> rank; rank 0 goes to exclude_modules (see the module docstring)."""
    ranks = {name: int(r) for name, r in (rank_pattern or {}).items()}
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": sorted(n for n, r in ranks.items() if r == 0) or None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False,
        "lora_dropout": lora.dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": lora.rank,
        "rank_pattern": {n: r for n, r in ranks.items() if r > 0},
        "revision": None, "target_modules": list(lora.targets), "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": lora.use_rslora, "velora_config": None,
    }
    return dict(sorted(config.items()))


def model_card(lora: LoraConfig, base_model: str, summary: dict | None,
               rank_pattern: Mapping[str, int] | None = None, adaptive: AdaLoraSettings | None = None) -> str:
    """A README in PEFT's front-matter convention plus what this adapter is and how it was trained; with per-module
    ranks, their layer x projection table (and the adaptive-rank settings that chose them, when given)."""
    lines = ["---", f"base_model: {base_model}", "library_name: peft", "pipeline_tag: text-generation", "tags:",
             f"- base_model:adapter:{base_model}", "- lora", "- transformers", "- lora-lab", "---", "",
             f"# LoRA adapter for {base_model}", "",
             "Trained with LoRA-Lab. Load it with PEFT:", "", "```python",
             "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
             f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
             "model = PeftModel.from_pretrained(base, 'path/to/this/folder')", "```", "",
             "## Adapter", "",
             (f"- rank r: {lora.rank}" if not rank_pattern else "- rank r: per projection (Ranks below)")
             + f", lora_alpha: {lora.alpha:g}, scaling: "
             + (f"{lora.alpha:g}/{'√r' if lora.use_rslora else 'r'} per module" if rank_pattern
                else f"{lora.scaling:g}") + f"{' (rsLoRA)' if lora.use_rslora else ''}",
             f"- target modules: {', '.join(lora.targets)}", f"- lora_dropout: {lora.dropout:g}", ""]
    if rank_pattern:
        lines += rank_table(lora, rank_pattern, adaptive)
    if summary:
        lines += ["## Training", ""]
        lines += [f"- {key}: {_card_value(value)}" for key, value in summary.items()]
        lines.append("")
    return "\n".join(lines)


def rank_table(lora: LoraConfig, rank_pattern: Mapping[str, int], adaptive: AdaLoraSettings | None) -> list[str]:
    """The card's "Ranks" section: a layer x projection table of the final ranks (0: no adapter there)."""
    ranks = {}
    for name, rank in rank_pattern.items():
        _, _, layer, _, proj = name.split(".")
        ranks[int(layer), proj] = int(rank)
    layers = max(layer for layer, _ in ranks) + 1
    targets = [t for t in TARGET_ORDER if t in lora.targets]
    table = [[ranks.get((layer, t), lora.rank) for t in targets] for layer in range(layers)]
    total = sum(map(sum, table))
    lines = ["## Ranks", ""]
    if adaptive is not None:
        lines += [(f"These ranks were chosen by adaptive rank (AdaLoRA, Zhang et al. 2023): every projection "
                   f"started at rank {adaptive.init_r} and the least important singular triplets were pruned toward "
                   f"an average rank of {adaptive.target_r}; the kept triplets are folded into plain LoRA A and B."),
                  "", "- settings: " + ", ".join(f"{k} {_card_value(v)}" for k, v in adaptive.to_dict().items()), ""]
    cells = layers * len(targets)
    lines += [(f"Total rank {total} over {cells} projections (average {total / cells:.2f}); 0: pruned, the base "
               "weight is used as is."), "",
              "| layer | " + " | ".join(targets) + " |", "|---:|" + "---:|" * len(targets)]
    lines += [f"| {layer} | " + " | ".join(map(str, row)) + " |" for layer, row in enumerate(table)]
    return lines + [""]


def _card_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _adapter_files(state: dict[str, np.ndarray], lora: LoraConfig, base_model: str, summary: dict | None,
                   rank_pattern: Mapping[str, int] | None, adaptive: AdaLoraSettings | None) -> dict[str, bytes]:
    from safetensors.numpy import save

    check_finite(state)
    if rank_pattern:
        check_rank_pattern(state, lora, rank_pattern)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return {
        WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(peft_config(lora, base_model, rank_pattern), indent=2) + "\n").encode(),
        CARD_NAME: model_card(lora, base_model, summary, rank_pattern, adaptive).encode(),
    }


def export_adapter(folder: str | Path, state: dict[str, np.ndarray], lora: LoraConfig, base_model: str,
                   summary: dict | None = None, rank_pattern: Mapping[str, int] | None = None,
                   adaptive: AdaLoraSettings | None = None) -> Path:
    """Write a PEFT adapter into `folder` (which may hold other things, e.g. checkpoints/), each file replaced
    atomically; weights first and config after, so a config never names weights that are not there yet.

    `rank_pattern` (module path -> rank, 0 for a projection without adapter): per-module ranks, with `state`
    holding A [rank, in] / B [out, rank] for each and nothing for rank 0; `adaptive`: the AdaLoRA settings that
    chose them, for the model card."""
    folder = Path(folder)
    for name, data in _adapter_files(state, lora, base_model, summary, rank_pattern, adaptive).items():
        atomic_write_bytes(folder / name, data)
    return folder


def write_adapter_files(folder: Path, state: dict[str, np.ndarray], lora: LoraConfig, base_model: str,
                        summary: dict | None = None, rank_pattern: Mapping[str, int] | None = None,
                        adaptive: AdaLoraSettings | None = None) -> list[str]:
    """Write the adapter into a folder nobody reads yet (a checkpoint being built); files fsynced."""
    files = _adapter_files(state, lora, base_model, summary, rank_pattern, adaptive)
    for name, data in files.items():
        write_bytes_synced(folder / name, data)
    return list(files)
