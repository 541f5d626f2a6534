"""Fold a PEFT LoRA adapter into its base model: a plain Hugging Face folder that needs no peft to load.

For every adapted Linear, W' = W + scale * B @ A (computed in float32, stored back in W's own dtype, so a bf16
base stays bf16). Every other tensor is copied bit for bit, shard by shard with the base's own file names and
index, so a tied LM head stays tied (it is not in the files) and nothing is duplicated. config.json,
generation_config.json, tokenizer and chat-template files are copied unchanged. The folder is built beside the
destination and renamed into place only when complete.

A base whose weights exist only as a GGUF file (engine.model.weights.gguf_of: a `.gguf` reference, the demo) has no
unquantized weights to fold into: each tensor is dequantized from the GGUF (engine.model.weights, one at a time,
bit for bit gguf-py's dequantization), the update added in float32, and the result stored as bfloat16
(`GGUF_MERGE_DTYPE`): half the size of float32, the dtype such models are published in, and far finer than the
4- or 8-bit blocks it came from. config.json then names that dtype.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic import atomic_folder, check_free_space
from engine.model.files import FLOAT_DTYPES, WeightFileError, safetensors_header
from engine.model.spec import SUPPORTED_MODEL_TYPES
from engine.model.references import COMPLETE_MARKER
from engine.model.weights import gguf_of, open_weights
from engine.lora.peft_read import check_fits_base, read_adapter, read_base_config

# Weight files of the base that are replaced by the merged safetensors, not copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_INDEX = "model.safetensors.index.json"
# Not copied: engine.model.references' marker says "converted from this GGUF / hub id", which is no longer true once merged.
_NOT_COPIED = {COMPLETE_MARKER}
GGUF_MERGE_DTYPE = "bfloat16"
_SHARD_BYTES = 2 << 30   # merged from a GGUF: shards of at most ~2 GiB, so only one shard is held at a time


@dataclass(frozen=True)
class MergedExport:
    path: Path
    n_merged: int             # Linear weights that received an update
    shards: tuple[str, ...]   # safetensors files written
    size_bytes: int
    dequantized_from: str = ""   # the base's GGUF formats ("Q4_1, Q6_K") when it had no unquantized weights
    dtype: str = ""              # the merged weights' dtype when it differs from the base's own ("bfloat16")


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
    if gguf_of(base_dir) is not None:
        return _export_merged_from_gguf(adapter, base_dir, out_dir, overwrite)
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


def _export_merged_from_gguf(adapter, base_dir: Path, out_dir: Path, overwrite: bool) -> MergedExport:
    """Merge into a base that exists only as GGUF: dequantize tensor by tensor, fold, store as GGUF_MERGE_DTYPE."""
    import torch
    from safetensors.torch import save_file

    source = open_weights(base_dir)
    views = getattr(source, "views", {})        # Phi-3's split members: the fused tensor is what is written
    stored = {name: tensor for name, tensor in source.stored().items() if name not in views}
    deltas = {f"{mod.name}.weight": mod for mod in adapter.modules}
    missing = sorted(set(deltas) - set(stored))
    if missing:
        raise ValueError(f"the base model in {base_dir} has no weights named {missing[:3]}; wrong base model?")
    dtype = getattr(torch, GGUF_MERGE_DTYPE)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    size = 0
    for name, tensor in stored.items():
        nbytes = int(np.prod(tensor.shape)) * itemsize
        if plan[-1] and size + nbytes > _SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    names = ["model.safetensors"] if len(plan) == 1 else [
        f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    check_free_space(out_dir.parent if not out_dir.exists() else out_dir,
                     sum(int(np.prod(t.shape)) * itemsize for t in stored.values()) + (16 << 20))
    merged = 0
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        for shard, members in zip(names, plan):
            tensors = {}
            for name in members:
                t = torch.from_numpy(source.f32(name))
                mod = deltas.get(name)
                if mod is not None:
                    t = t + torch.from_numpy(mod.delta())
                    merged += 1
                t = t.to(dtype)
                if mod is not None and not torch.isfinite(t).all():
                    raise ValueError(f"merging overflows {dtype} in {name}: the adapter's update is too large; "
                                     "this adapter cannot be merged")
                tensors[name] = t.contiguous()
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            del tensors
        if len(names) > 1:
            weight_map = {name: shard for shard, members in zip(names, plan) for name in members}
            index = {"metadata": {"total_size": sum(int(np.prod(stored[n].shape)) * itemsize for n in weight_map)},
                     "weight_map": weight_map}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
        for item in base_dir.iterdir():
            if item.name in _NOT_COPIED or not item.is_file() or item.name.endswith(_WEIGHT_SUFFIXES):
                continue
            if item.name == "config.json":
                config = json.loads(item.read_text(encoding="utf-8"))
                config["dtype"] = GGUF_MERGE_DTYPE
                (tmp / item.name).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            else:
                shutil.copy2(item, tmp / item.name)
    counts: dict[str, int] = {}
    for tensor in stored.values():
        if len(tensor.shape) == 2:
            counts[tensor.format.name] = counts.get(tensor.format.name, 0) + 1
    formats = ", ".join(sorted(counts, key=lambda f: -counts[f]))
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return MergedExport(path=out_dir, n_merged=merged, shards=tuple(names), size_bytes=size,
                        dequantized_from=formats, dtype=GGUF_MERGE_DTYPE)


def _all_keys(base_dir: Path, shards: list[str]) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in shards:
        with safe_open(base_dir / shard, framework="pt") as f:
            keys.update(f.keys())
    return keys
