"""Training checkpoints written atomically, so a crash or a kill never leaves one that looks whole but is not.

A checkpoint is a folder `checkpoint-<step>` under `<out>/checkpoints/` holding the adapter (a loadable PEFT
adapter), the optimizer state, and trainer_state.json (run configuration, schedule position, data position, RNG
state). It is built in a temporary folder, every file fsynced, manifest.json (sizes and SHA-256 of every file)
written last, then renamed into place: a folder without a valid manifest is never a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.lora.peft_read import import_adapter
from engine.lora.peft_write import write_adapter_files
from engine.atomic import fsync_dir, write_bytes_synced
from engine.lora.config import LoraConfig
from engine.model.files import safetensors_header
from engine.model.spec import ModelSpec

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
MANIFEST = "manifest.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
FORMAT = "lora-lab-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    path: Path
    step: int
    lora: LoraConfig
    lora_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    trainer_state: dict


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(root: str | Path, step: int, lora: LoraConfig, lora_state: dict[str, np.ndarray],
                    optimizer_state: dict[str, np.ndarray], trainer_state: dict, base_model: str,
                    keep: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`; return its folder."""
    from safetensors.numpy import save

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(TMP_PREFIX + "*"):     # left by a run that was killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        names = write_adapter_files(tmp, lora_state, lora, base_model)
        # safetensors has no 0-d tensors (it reads them back as [1]): name the scalars so load restores them.
        scalars = sorted(k for k, v in optimizer_state.items() if np.ndim(v) == 0)
        write_bytes_synced(tmp / OPTIMIZER, save({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()},
                                                 metadata={"format": "np", "scalars": json.dumps(scalars)}))
        write_bytes_synced(tmp / STATE, (json.dumps(trainer_state, indent=1) + "\n").encode())
        names += [OPTIMIZER, STATE]
        manifest = {"format": FORMAT, "version": VERSION, "step": step,
                    "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in names}}
        write_bytes_synced(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():
            # Same step written again (a resumed run stopping where it started): swap, then drop the old one.
            old = root / f"{TMP_PREFIX}old-{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
        # Renamed out of the checkpoint names first (atomic), so a kill while deleting leaves a temporary folder
        # that the next save clears, never a half-deleted checkpoint-<step>.
        doomed = root / f"{TMP_PREFIX}pruned-{stale.name}-{os.getpid()}"
        os.replace(stale, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete checkpoint; raise CheckpointError naming what is missing or corrupt."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} — not a checkpoint, or one whose writing was interrupted")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is corrupt ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a LoRA-Lab v{VERSION} checkpoint "
                              f"({manifest.get('format')!r} v{manifest.get('version')!r})")
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != info["bytes"] or _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} is missing or does not match its manifest (corrupt checkpoint)")
    return manifest


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (manifest present) under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(PREFIX + "*") if p.is_dir() and (p / MANIFEST).is_file()
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint that verifies, skipping corrupt ones."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError:
            continue
    return None


def load_checkpoint(path: str | Path, spec: ModelSpec) -> Checkpoint:
    """Read and verify a checkpoint folder (or the newest one under a run's out folder or checkpoints/)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if not (path / MANIFEST).exists() and not path.name.startswith(PREFIX):
        newest = latest_checkpoint(path) or latest_checkpoint(checkpoint_root(path))
        if newest is None:
            raise CheckpointError(f"{path}: neither a checkpoint nor a folder holding complete checkpoints")
        path = newest
    manifest = verify_checkpoint(path)
    lora, lora_state, _ = import_adapter(path, spec)
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    state_lora = LoraConfig(**{**state["config"]["lora"], "targets": tuple(state["config"]["lora"]["targets"])})
    if state_lora != lora:
        raise CheckpointError(f"{path}: adapter_config.json and {STATE} disagree about the LoRA settings")
    return Checkpoint(path=path, step=int(manifest["step"]), lora=state_lora, lora_state=lora_state,
                      optimizer_state=_load_optimizer(path / OPTIMIZER), trainer_state=state)


def _load_optimizer(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    safetensors_header(file, "optimizer state")   # verify_checkpoint's hashes cover it; this names a bad header
    with safe_open(file, framework="np") as handle:
        scalars = set(json.loads((handle.metadata() or {}).get("scalars", "[]")))
        return {k: handle.get_tensor(k).reshape(()) if k in scalars else handle.get_tensor(k)
                for k in handle.keys()}
