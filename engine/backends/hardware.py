"""What this machine has for training: every wgpu adapter, the CPU, RAM and GPU memory where it can be read.

Every figure is read from the system; where one cannot be read (GPU memory without NVML, say) it is reported
as None ("unknown"), never guessed.
"""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field


# The features and limits that decide whether and how fast we can train.
FEATURES_OF_INTEREST = ("shader-f16", "subgroup", "subgroup-barrier", "timestamp-query", "shader-float32-atomic")
LIMITS_OF_INTEREST = ("max-buffer-size", "max-storage-buffer-binding-size", "max-compute-workgroup-storage-size",
                      "max-compute-invocations-per-workgroup", "max-storage-buffers-per-shader-stage",
                      "max-compute-workgroups-per-dimension")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    vendor: str
    backend: str            # Vulkan | Metal | D3D12 | OpenGL
    adapter_type: str       # DiscreteGPU | IntegratedGPU | CPU | Unknown
    driver: str
    software: bool          # a CPU rasteriser such as lavapipe: never picked automatically
    features: tuple[str, ...]
    all_features: tuple[str, ...]
    limits: dict
    memory_bytes: int | None = None   # from NVML where the adapter is NVIDIA; None = unknown


@dataclass(frozen=True)
class HardwareReport:
    adapters: tuple[AdapterInfo, ...]
    cpu_model: str
    cpu_cores_physical: int | None
    cpu_cores_logical: int
    ram_bytes: int
    ram_available_bytes: int
    os: str
    python: str
    versions: dict = field(default_factory=dict)
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gpus = [a for a in self.adapters if not a.software and a.backend != "OpenGL"]
        gpu = f"{gpus[0].name} ({gpus[0].backend})" if gpus else "no hardware GPU"
        return f"{gpu} · {self.cpu_model} × {self.cpu_cores_logical} · {self.ram_bytes / 2**30:.1f} GiB RAM"


def adapter_is_software(info: dict) -> bool:
    """Lavapipe, SwiftShader, WARP and llvmpipe: usable for tests, never chosen automatically for training."""
    kind = str(info.get("adapter_type", "")).lower()
    name = str(info.get("device", "")).lower()
    return "cpu" in kind or any(s in name for s in ("llvmpipe", "lavapipe", "swiftshader", "warp"))


def cpu_threads() -> int:
    """Cores this process may run on (affinity-aware, so containers and taskset are honoured)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml_memory() -> dict[str, int]:
    """{device name: total bytes} from NVML; empty where NVML is absent (no NVIDIA driver)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            out[name.decode() if isinstance(name, bytes) else name] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        return out
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_bytes() -> int | None:
    """The memory of the largest GPU whose size the driver tells (NVML), or None where none can be read."""
    return max(nvml_memory().values(), default=None)


def list_adapters() -> tuple[list[AdapterInfo], list[str]]:
    errors: list[str] = []
    try:
        import wgpu
        raw = wgpu.gpu.enumerate_adapters_sync()
    except Exception as exc:
        return [], [f"wgpu could not enumerate adapters: {exc}"]
    nvml = nvml_memory()
    adapters = []
    for a in raw:
        info = a.info
        feats = sorted(str(f) for f in a.features)
        memory = next((v for k, v in nvml.items() if k in info["device"] or info["device"] in k), None)
        adapters.append(AdapterInfo(
            name=info["device"], vendor=info.get("vendor") or f"0x{info.get('vendor_id', 0):04x}",
            backend=info["backend_type"], adapter_type=info["adapter_type"], driver=info.get("description", ""),
            software=adapter_is_software(info), features=tuple(f for f in FEATURES_OF_INTEREST if f in feats),
            all_features=tuple(feats), limits={k: int(a.limits[k]) for k in LIMITS_OF_INTEREST if k in a.limits},
            memory_bytes=memory))
    return adapters, errors


def detect() -> HardwareReport:
    import psutil

    adapters, errors = list_adapters()
    mem = psutil.virtual_memory()
    versions = {}
    for pkg in ("wgpu", "torch", "transformers", "peft", "onnxruntime"):
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return HardwareReport(
        adapters=tuple(adapters), cpu_model=cpu_model(), cpu_cores_physical=psutil.cpu_count(logical=False),
        cpu_cores_logical=os.cpu_count() or 1, ram_bytes=int(mem.total), ram_available_bytes=int(mem.available),
        os=platform.platform(), python=platform.python_version(), versions=versions, errors=tuple(errors))
