"""Saving an adapter in the formats the save dialog offers (no widgets): PEFT, GGUF + Modelfile, merged model.

Every line of the summary names a file that was written and a figure read back from disk.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


@dataclass(frozen=True)
class SaveRequest:
    adapter: Path          # the PEFT folder a training run wrote (or any loaded adapter)
    base_model: str        # reference of the base (folder, .gguf, hub id)
    folder: Path           # where to write
    peft: bool = True
    gguf: bool = False
    merged: bool = False

    def __post_init__(self):
        if not (self.peft or self.gguf or self.merged):
            raise ValueError("choose at least one format to save")
        if not (Path(self.adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{self.adapter} is not a PEFT adapter folder (no adapter_config.json)")


def save_adapter(request: SaveRequest, progress=None) -> list[str]:
    from engine.export.run import ExportRequest, run_export

    folder, name = Path(request.folder), Path(request.adapter).name
    lines = []
    if request.peft:
        _say(progress, "copying the PEFT adapter")
        target = folder / name
        if target.exists():
            raise FileExistsError(f"{target} already exists; choose another folder")
        target.mkdir(parents=True)
        for file in PEFT_FILES:
            source = Path(request.adapter) / file
            if source.is_file():
                shutil.copy2(source, target / file)
                lines.append(f"PEFT: {target / file} ({(target / file).stat().st_size / 1024:.1f} KiB)")
    if request.gguf:
        _say(progress, "writing the GGUF adapter and Ollama Modelfile")
        result = run_export(ExportRequest(request.base_model, Path(request.adapter), "gguf", folder / f"{name}-gguf"))
        lines += [f"GGUF: {line}" for line in result.lines]
    if request.merged:
        _say(progress, "merging the adapter into the base model")
        result = run_export(ExportRequest(request.base_model, Path(request.adapter), "merged",
                                          folder / f"{name}-merged"))
        lines += [f"merged: {line}" for line in result.lines]
    return lines


def _say(progress, text: str) -> None:
    if progress is not None:
        progress(text)
