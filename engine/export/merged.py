"""Fold a PEFT LoRA adapter into its base model: a plain Hugging Face folder that needs no peft to load.

For every adapted Linear, W' = W + scale * B @ A (computed in float32, stored back in W's own dtype, so a bf16
base stays bf16). Every other tensor is copied bit for bit, shard by shard with the base's own file names and
index, so a tied LM head stays tied (it is not in the files) and nothing is duplicated. config.json,
generation_config.json, tokenizer and chat-template files are copied unchanged. The folder is built beside the
destination and renamed into place only when complete.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.atomic import atomic_folder, check_free_space
from engine.model.files import FLOAT_DTYPES, WeightFileError, safetensors_header
from engine.model.spec import SUPPORTED_MODEL_TYPES
from engine.model.references import COMPLETE_MARKER
from engine.lora.peft_read import check_fits_base, read_adapter, read_base_config

# Weight files of the base that are replaced by the merged safetensors, not copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_INDEX = "model.safetensors.index.json"
# Not copied: engine.model.references' marker says "converted from this GGUF / hub id", which is no longer true once merged.
_NOT_COPIED = {COMPLETE_MARKER}


@dataclass(frozen=True)
class MergedExport:
    path: Path
    n_merged: int             # Linear weights that received an update
    shards: tuple[str, ...]   # safetensors files written
    size_bytes: int


def _weight_files(base_dir: Path) -> list[str]:
    index = base_dir / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{base_dir} has no model.safetensors (or {_INDEX}); merging needs safetensors weights"
                            " — re-save the base with save_pretrained(safe_serialization=True)")


def export_merged(adapter_dir: Path | str, base_dir: Path | str, out_dir: Path | str,
                  overwrite: bool = False) -> MergedExport:
    """Write base + adapter merged into `out_dir` (a new folder, or replaced as a whole when `overwrite`)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.resolve() in (base_dir.resolve(), Path(adapter_dir).resolve()):
        raise ValueError(f"--out {out_dir} is the base or adapter folder itself; choose a new folder")
    adapter = read_adapter(adapter_dir)
    base_config = read_base_config(base_dir)
    if base_config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot merge into base architecture {base_config.get('model_type')!r}"
                         f" (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    check_fits_base(adapter, base_config)
    shards = _weight_files(base_dir)
    for shard in shards:    # a truncated or damaged shard is refused by name before anything is written
        for key, entry in safetensors_header(base_dir / shard, "model weights").items():
            if entry.dtype not in FLOAT_DTYPES:     # as the training engines refuse it (engine.model.weights)
                raise WeightFileError(f"{base_dir / shard}: tensor {key} is stored as {entry.dtype}; a base "
                                      f"model's weights are {', '.join(FLOAT_DTYPES)}")
    check_free_space(out_dir.parent if not out_dir.exists() else out_dir,
                     sum((base_dir / s).stat().st_size for s in shards) + (16 << 20))

    deltas = {f"{mod.name}.weight": mod for mod in adapter.modules}
    merged = 0
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        for shard in shards:
            tensors = {}
            with safe_open(base_dir / shard, framework="pt") as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    t = f.get_tensor(key)
                    mod = deltas.get(key)
                    if mod is not None:
                        update = torch.from_numpy(mod.delta())
                        t = (t.to(torch.float32) + update).to(t.dtype)
                        if not torch.isfinite(t).all():
                            raise ValueError(f"merging overflows {t.dtype} in {key}: the adapter's update is too"
                                             " large for the base's dtype; this adapter cannot be merged")
                        merged += 1
                    tensors[key] = t.contiguous()
            save_file(tensors, tmp / shard, metadata={**metadata, "format": "pt"})
            del tensors
        if merged != len(deltas):
            missing = sorted(set(deltas) - _all_keys(base_dir, shards))
            raise ValueError(f"the base model in {base_dir} has no weights named {missing[:3]}; wrong base model?")
        for item in base_dir.iterdir():
            if item.name in _NOT_COPIED or not item.is_file():
                continue
            if item.name == _INDEX or not item.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(item, tmp / item.name)
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return MergedExport(path=out_dir, n_merged=merged, shards=tuple(shards), size_bytes=size)


def _all_keys(base_dir: Path, shards: list[str]) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in shards:
        with safe_open(base_dir / shard, framework="pt") as f:
            keys.update(f.keys())
    return keys
