"""Backend speeds measured by `auto`, kept per machine and model shape, so the next run (and the wizard's ETA) need
not measure again.

`auto` measures each candidate for a few steps before a run: on a 2-core CPU with a 135M model that is most of a
minute in which nothing else happens. What it measured depends on the machine (CPU model and threads, GPU
adapters), the model's shape (not its weights) and the run's shape (batch, sequence length, LoRA rank and targets,
weight format, recompute); the key is exactly these, so a change of any of them measures again.
The file is JSON in the data folder (engine.model.references.data_dir), one entry per key.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FILE = "backend-speeds.json"
MAX_ENTRIES = 64      # oldest dropped first: a cache, not a history


def cache_path() -> Path:
    """LORA_LAB_CACHE names the folder (tests give each run its own; child processes inherit it)."""
    from engine.model.references import data_dir

    folder = os.environ.get("LORA_LAB_CACHE")
    return (Path(folder) if folder else data_dir() / "cache") / FILE


def machine_id(adapters: list[str], threads: int | None) -> str:
    """The CPU model, the threads the CPU backend may use and the hardware adapters' names."""
    from engine.backends.hardware import cpu_model, cpu_threads

    return f"{cpu_model()} x{threads or cpu_threads()} | " + ", ".join(sorted(adapters))


def model_shape(spec) -> dict:
    """What the speed depends on in the model: its shape, not its weights or its name."""
    return {"type": spec.model_type, "layers": spec.layers, "hidden": spec.hidden,
            "intermediate": spec.intermediate, "heads": spec.heads, "kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim, "vocab": spec.vocab_size}


def run_key(machine: str, spec, lora, batch_size: int, seq_len: int, memory) -> str:
    text = json.dumps({"machine": machine, "model": model_shape(spec), "rank": lora.rank,
                       "targets": sorted(lora.targets), "batch": batch_size, "seq_len": seq_len,
                       "weights": memory.weights, "recompute": memory.recompute}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}              # no cache yet, or a damaged one: measure again
    return data if isinstance(data, dict) else {}


def lookup(key: str, path: Path | None = None) -> dict[str, float] | None:
    """{candidate kind: tokens/s} measured before under `key`, or None."""
    entry = _read(path or cache_path()).get(key)
    if not isinstance(entry, dict) or not entry.get("tokens_per_s"):
        return None
    return {str(k): float(v) for k, v in entry["tokens_per_s"].items()}


def store(key: str, tokens_per_s: dict[str, float], describe: dict, path: Path | None = None) -> None:
    """Keep what was measured under `key` (with `describe`, what the key stands for, for a reader of the file)."""
    path = path or cache_path()
    data = _read(path)
    data.pop(key, None)
    data[key] = {"tokens_per_s": tokens_per_s, **describe}
    while len(data) > MAX_ENTRIES:
        data.pop(next(iter(data)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)          # atomic: a run reading it meanwhile sees the old file or the new one


def latest_for(spec, path: Path | None = None) -> dict | None:
    """The most recent entry measured on this computer (same CPU) for this model shape, any run shape, or None:
    the wizard's ETA before a run starts. Its "tokens_per_s", "batch" and "seq_len" say what was measured."""
    from engine.backends.hardware import cpu_model

    shape, cpu = model_shape(spec), cpu_model()
    for entry in reversed(list(_read(path or cache_path()).values())):
        if isinstance(entry, dict) and entry.get("model") == shape and \
                str(entry.get("machine", "")).startswith(cpu + " x"):
            return entry
    return None
