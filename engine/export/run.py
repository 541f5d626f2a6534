"""One entry point for every export, shared by `lora-lab export` and the save-adapter dialog.

`ExportRequest` is validated once, at the edge; `run_export` resolves the base model, writes the files and
returns an `ExportResult` whose `lines` are what to show the user (every number in them is read back from what
was written).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.model.references import resolve_for_gguf

EXPORT_TARGETS = ("gguf", "merged")


@dataclass(frozen=True)
class ExportRequest:
    model: str                 # base model: local HF folder, .gguf file or hub id (engine.model.references.resolve_model)
    adapter: Path              # PEFT adapter folder
    to: str                    # "gguf" | "merged"
    out: Path                  # gguf: a folder, or a file name ending in .gguf; merged: a new folder
    gguf_dtype: str = "f32"    # "f32" (exact, llama.cpp's converter default) | "f16" (half the size)
    overwrite: bool = False

    def __post_init__(self):
        if self.to not in EXPORT_TARGETS:
            raise ValueError(f"export target {self.to!r} is not known; use one of {', '.join(EXPORT_TARGETS)}")
        if self.gguf_dtype not in ("f16", "f32"):
            raise ValueError(f"GGUF tensor type {self.gguf_dtype!r} is not supported; use f16 or f32")
        if not Path(self.adapter).is_dir():
            raise FileNotFoundError(f"adapter folder {self.adapter} does not exist")
        if self.to == "merged" and str(self.out).lower().endswith(".gguf"):
            raise ValueError(f"--to merged writes a folder, but --out {self.out} looks like a .gguf file name")


@dataclass(frozen=True)
class ExportResult:
    files: tuple[Path, ...]
    lines: tuple[str, ...] = field(default=())


def _gguf_target(out: Path, adapter: Path) -> Path:
    from engine.export.ollama import ollama_model_name

    if out.suffix.lower() == ".gguf":
        return out
    return out / f"{ollama_model_name(adapter)}.gguf"


def run_export(request: ExportRequest, log: Callable[[str], None] = lambda _msg: None) -> ExportResult:
    """Write the export; `log` gets progress lines (model download or GGUF conversion) as they happen."""
    from engine.lora.adalora_write import plain_lora_folder
    from engine.lora.peft_read import read_adapter

    request = replace(request, adapter=plain_lora_folder(request.adapter))
    read_adapter(request.adapter)  # refuse DoRA & co. before a possibly slow download or GGUF conversion
    base_dir, base_ref = resolve_for_gguf(request.model, log=log)
    if request.to == "merged":
        from engine.export.merged import export_merged

        merged = export_merged(request.adapter, base_dir, request.out, overwrite=request.overwrite)
        lines = [f"merged {merged.n_merged} LoRA weights into {merged.path} ({merged.size_bytes / 2**20:.1f} MiB,"
                 f" {len(merged.shards)} safetensors file(s)); load it with AutoModelForCausalLM.from_pretrained"]
        if merged.dequantized_from:
            lines.append(f"the base was only available as GGUF ({merged.dequantized_from}): the merged weights are "
                         f"dequantized from it and stored as {merged.dtype}, so they carry the GGUF's quantization "
                         "error, not the original model's precision")
        return ExportResult(files=(merged.path,), lines=tuple(lines))

    from engine.export.gguf import export_gguf_adapter
    from engine.export.ollama import MODELFILE, NOTE, write_ollama_files

    target = _gguf_target(Path(request.out), Path(request.adapter))
    for existing in (target, target.parent / MODELFILE, target.parent / NOTE):
        if existing.exists() and not request.overwrite:
            raise FileExistsError(f"{existing} already exists; choose another --out or pass --force")
    written = export_gguf_adapter(request.adapter, base_dir, target, dtype=request.gguf_dtype)
    modelfile, note, conversion = write_ollama_files(target.parent, base_ref, base_dir, target, written.arch,
                                                     written.alpha, list(written.ranks), Path(request.adapter))
    lines = [f"wrote {written.path} ({written.n_tensors} tensors, {request.gguf_dtype}, arch {written.arch},"
             f" adapter.lora.alpha {written.alpha:g}, {written.size_bytes / 1024:.1f} KiB)"]
    if written.permuted:
        lines.append(f"applied llama.cpp's Q/K row permutation to {len(written.permuted)} lora_b tensors")
    if written.rescaled:
        lines.append(f"folded per-module scale into {len(written.rescaled)} lora_b tensors (rank/alpha patterns)")
    lines.append(f"wrote {modelfile} (chat template: {conversion.reason}) and {note}")
    return ExportResult(files=(written.path, modelfile, note), lines=tuple(lines))
