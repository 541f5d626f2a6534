"""The wgpu device and the plumbing every kernel twin shares: shader loading, pipeline cache, buffers, dispatch.

A kernel twin (one per `shaders/<family>.wgsl`) asks this context for its pipelines by (file, entry point,
constants) and records dispatches into a `StepEncoder`; nothing here knows about transformers.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import wgpu

from engine.backends.hardware import adapter_is_software

STORAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
UNIFORM = wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST


SHADER_CHECKS_ENV = "LORA_LAB_SHADER_CHECKS"   # "1": compile with naga's runtime checks (see create_module)


class NoAdapterError(RuntimeError):
    """No wgpu adapter could be had (no Vulkan/Metal/DX12 driver, not even a software one)."""


INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+)\.wgsl"[ \t]*$', re.M)


@functools.cache
def shader_source(family: str) -> str:
    """Text of `shaders/<family>.wgsl` with its `#include "<name>.wgsl"` lines replaced by those files' text.

    Found through importlib.resources (installed or editable). Each file is included once per shader (later
    includes of it become empty), so a prelude can be named by several files that include one another.
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = resources.files("shaders").joinpath(f"{name}.wgsl").read_text(encoding="utf-8")
        return INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(family)


TRUSTED_BACKENDS = ("Vulkan",)   # where modules are compiled without runtime checks (create_module)


def create_module(device: wgpu.GPUDevice, label: str, code: str, backend: str = "Vulkan") -> wgpu.GPUShaderModule:
    """A WGSL module compiled without naga's runtime checks (wgpuDeviceCreateShaderModuleTrusted, checks None).

    Why: by default naga clamps every dynamic index into a private or workgroup array and adds a counter and an
    exit test to every loop (ForceLoopBounding), in every inner loop of the GEMM and attention kernels: +25-30%
    GEMM speed without them on the H200 (bench/results/matmul-h200-checked.json against -trusted.json). Our
    shaders guard their own bounds (every kernel has a numpy reference test at odd shapes, where an index past
    an edge would show), and on Vulkan storage-buffer accesses stay under the driver's robust buffer access either
    way. Only on `TRUSTED_BACKENDS`: Metal and D3D12 have no such guarantee and were never measured or tested here,
    so they keep the checks. LORA_LAB_SHADER_CHECKS=1 keeps them everywhere. Falls back to the checked module
    where the wgpu build has no trusted entry point.
    """
    if os.environ.get(SHADER_CHECKS_ENV) == "1" or backend not in TRUSTED_BACKENDS:
        return device.create_shader_module(label=label, code=code)
    try:
        from wgpu.backends.wgpu_native import _api
    except ImportError:
        return device.create_shader_module(label=label, code=code)
    trusted = getattr(_api.libf, "wgpuDeviceCreateShaderModuleTrusted", None)
    if trusted is None or not isinstance(device, _api.GPUDevice):
        return device.create_shader_module(label=label, code=code)
    source = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(code))
    source[0].chain.next = _api.ffi.NULL
    source[0].chain.sType = _api.lib.WGPUSType_ShaderSourceWGSL
    chained = _api.ffi.cast("WGPUChainedStruct *", source)
    descriptor = _api.new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=chained,
                                   label=_api.to_c_string_view(label))
    module = trusted(device._internal, descriptor, _api.lib.WGPUShaderRuntimeChecks_None)
    if module == _api.ffi.NULL:
        raise RuntimeError(f"shader module {label!r} could not be created")
    return _api.GPUShaderModule(label, module, device)


@dataclass
class GpuContext:
    adapter: wgpu.GPUAdapter
    device: wgpu.GPUDevice
    label: str
    _pipelines: dict = field(default_factory=dict, repr=False)
    _modules: dict = field(default_factory=dict, repr=False)
    bytes_allocated: int = 0
    gemm_tuner: object = None   # engine.backends.wgpu.tuning.GemmTuner where tiles are measured (a real GPU)

    @classmethod
    def create(cls, adapter_name: str | None = None, allow_software: bool = True) -> "GpuContext":
        """Open a device on the adapter whose name contains `adapter_name`, else the high-performance one.

        LORA_LAB_ADAPTER in the environment picks an adapter by name too.
        """
        adapter_name = adapter_name or os.environ.get("LORA_LAB_ADAPTER")
        try:
            adapters = wgpu.gpu.enumerate_adapters_sync()
        except Exception as exc:  # the wgpu-native library itself may fail to load
            raise NoAdapterError(f"wgpu could not enumerate adapters: {exc}") from exc
        if adapter_name:
            matching = [a for a in adapters if adapter_name.lower() in a.info["device"].lower()]
            if not matching:
                names = ", ".join(a.info["device"] for a in adapters) or "none"
                raise NoAdapterError(f"no wgpu adapter named like {adapter_name!r}; found: {names}")
            adapter = matching[0]
        else:
            # Prefer native compute APIs over the GL backend, and real GPUs over software rasterisers.
            native = [a for a in adapters if a.info["backend_type"] in ("Vulkan", "Metal", "D3D12")] or adapters
            ranked = sorted(native, key=lambda a: (adapter_is_software(a.info),
                                                   a.info["adapter_type"] != "DiscreteGPU"))
            adapter = ranked[0] if ranked else None
            if adapter is None:
                raise NoAdapterError("no Vulkan, Metal or DX12 adapter found (install a GPU driver or Mesa lavapipe)")
        if not allow_software and adapter_is_software(adapter.info):
            raise NoAdapterError(f"only a software adapter is present ({adapter.info['device']})")
        wanted = [f for f in ("shader-f16", "subgroup", "timestamp-query") if f in adapter.features]
        limits = {k: adapter.limits[k] for k in (
            "max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage",
            "max-compute-workgroup-storage-size", "max-compute-invocations-per-workgroup",
            "max-compute-workgroup-size-x", "max-compute-workgroups-per-dimension") if k in adapter.limits}
        device = adapter.request_device_sync(label="lora-lab", required_features=wanted, required_limits=limits)
        return cls(adapter=adapter, device=device, label=adapter.info["device"])

    # ---- limits -----------------------------------------------------------------------------------------
    @property
    def max_binding_bytes(self) -> int:
        return int(self.device.limits["max-storage-buffer-binding-size"])

    @property
    def max_buffer_bytes(self) -> int:
        return int(self.device.limits["max-buffer-size"])

    @property
    def max_workgroups(self) -> int:
        return int(self.device.limits["max-compute-workgroups-per-dimension"])

    @property
    def has_f16(self) -> bool:
        return "shader-f16" in self.device.features

    # ---- shaders and pipelines ----------------------------------------------------------------------------
    def pipeline(self, family: str, entry_point: str, constants: dict | None = None) -> wgpu.GPUComputePipeline:
        """The compute pipeline for `entry_point` of `shaders/<family>.wgsl`, created once per constants."""
        key = (family, entry_point, tuple(sorted((constants or {}).items())))
        if key not in self._pipelines:
            if family not in self._modules:
                self._modules[family] = create_module(self.device, family, shader_source(family),
                                                      self.adapter.info.get("backend_type", ""))
            compute = {"module": self._modules[family], "entry_point": entry_point}
            if constants:
                compute["constants"] = {k: float(v) for k, v in constants.items()}
            self._pipelines[key] = self.device.create_compute_pipeline(
                label=f"{family}.{entry_point}", layout="auto", compute=compute)
        return self._pipelines[key]

    def bind_group(self, pipeline: wgpu.GPUComputePipeline, bindings: dict, label: str = "") -> wgpu.GPUBindGroup:
        """Bind group 0 from {binding number: buffer or (buffer, byte offset, byte size)}.

        By number, not position: entry points of one shader use different subsets of its bindings (layout="auto"
        keeps only those an entry point uses).
        """
        entries = []
        for number, b in sorted(bindings.items()):
            buf, offset, size = b if isinstance(b, tuple) else (b, 0, b.size)
            entries.append({"binding": number, "resource": {"buffer": buf, "offset": offset, "size": size}})
        return self.device.create_bind_group(label=label, layout=pipeline.get_bind_group_layout(0), entries=entries)

    # ---- buffers ----------------------------------------------------------------------------------------
    def buffer(self, nbytes: int, label: str, usage=STORAGE) -> wgpu.GPUBuffer:
        """A zero-filled buffer; sizes round up to 16 bytes so vec4 loads never run off the end."""
        size = max(16, (int(nbytes) + 15) // 16 * 16)
        if size > self.max_buffer_bytes:
            raise MemoryError(f"buffer {label!r} needs {size} bytes; this adapter allows {self.max_buffer_bytes}")
        self.bytes_allocated += size
        return self.device.create_buffer(label=label, size=size, usage=usage)

    def upload(self, array: np.ndarray, label: str, usage=STORAGE) -> wgpu.GPUBuffer:
        data = np.ascontiguousarray(array)
        buf = self.buffer(data.nbytes, label, usage)
        if data.nbytes:
            self.device.queue.write_buffer(buf, 0, data.tobytes())
        return buf

    def write(self, buf: wgpu.GPUBuffer, array: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(array)
        self.device.queue.write_buffer(buf, offset, data.tobytes())

    def read(self, buf: wgpu.GPUBuffer, dtype=np.float32, count: int | None = None, offset: int = 0) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        size = buf.size - offset if count is None else count * itemsize
        raw = self.device.queue.read_buffer(buf, buffer_offset=offset, size=size)
        return np.frombuffer(raw, dtype=dtype).copy()

    def encoder(self, label: str = "step") -> "StepEncoder":
        return StepEncoder(self, label)


class StepEncoder:
    """Records dispatches into one command encoder and as few compute passes as possible, then submits.

    Within one compute pass wgpu orders dispatches and makes each one's writes visible to the next.
    """

    def __init__(self, ctx: GpuContext, label: str):
        self.ctx = ctx
        self.encoder = ctx.device.create_command_encoder(label=label)
        self._pass = None
        self.dispatches = 0

    def dispatch(self, pipeline, bind_group, x: int, y: int = 1, z: int = 1) -> None:
        limit = self.ctx.max_workgroups
        if max(x, y, z) > limit:
            raise ValueError(f"dispatch ({x}, {y}, {z}) exceeds {limit} workgroups per dimension; fold it into y")
        if x == 0 or y == 0 or z == 0:
            return
        if self._pass is None:
            self._pass = self.encoder.begin_compute_pass()
        self._pass.set_pipeline(pipeline)
        self._pass.set_bind_group(0, bind_group)
        self._pass.dispatch_workgroups(x, y, z)
        self.dispatches += 1

    def copy(self, src, src_offset: int, dst, dst_offset: int, nbytes: int) -> None:
        """Buffer copies need the pass closed; the next dispatch opens a new one."""
        self._end_pass()
        self.encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, nbytes)

    def _end_pass(self) -> None:
        if self._pass is not None:
            self._pass.end()
            self._pass = None

    def submit(self) -> None:
        self._end_pass()
        self.ctx.device.queue.submit([self.encoder.finish()])
