"""Which training backend runs: `--backend auto|cpu|wgpu|wgpu:<adapter name>`.

`auto` measures every candidate for a few steps on the real model and batch shape — each wgpu adapter that is not
a software rasteriser, and the CPU backend (onnxruntime) — and uses the fastest; the report says what was
measured and why a candidate was skipped. Software adapters (lavapipe, llvmpipe, SwiftShader, WARP) train only
when named: `wgpu:llvmpipe`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.backends.base import MemoryOptions, OptimizerConfig, TrainingBackend
from engine.lora.config import LoraConfig

BACKEND_KINDS = ("auto", "cpu", "wgpu", "wgpu:<adapter name>")


def parse_backend_kind(kind: str) -> tuple[str, str | None]:
    """("auto" | "cpu" | "wgpu", adapter substring or None); ValueError for anything else."""
    kind = (kind or "").strip()
    if kind in ("auto", "cpu", "wgpu"):
        return kind, None
    if kind.startswith("wgpu:") and kind[5:].strip():
        return "wgpu", kind[5:].strip()
    raise ValueError(f"backend {kind!r} is unknown; choose from {', '.join(BACKEND_KINDS)}")


@dataclass(frozen=True)
class BuildArgs:
    model_dir: Path
    lora: LoraConfig
    optim: OptimizerConfig
    batch_size: int
    seq_len: int
    seed: int = 0
    init_state: dict | None = field(default=None, repr=False)
    threads: int | None = None      # CPU backend threads; None: every core this process may run on
    memory: MemoryOptions = MemoryOptions()   # the WGSL backend's weight format, recompute, math (CPU: ignored)


@dataclass
class Candidate:
    kind: str                            # "cpu" or "wgpu:<adapter name>"
    name: str                            # the adapter or the CPU model, as shown
    tokens_per_s: float | None = None    # measured; None when not measured
    seconds_per_step: float | None = None
    skipped: str | None = None           # why it was not measured


@dataclass
class BackendChoice:
    chosen: str                          # a Candidate.kind
    batch_size: int
    seq_len: int
    measured_steps: int
    candidates: list[Candidate]
    cached: bool = False                 # the speeds were measured by an earlier run (engine.backends.measured)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        how = "measured earlier on this machine for this model and shape; delete the cache file to measure " \
            "again" if self.cached else f"{self.measured_steps} steps each"
        out = [f"backend: {self.chosen} (measured on [{self.batch_size}, {self.seq_len}], {how})"]
        for c in self.candidates:
            mark = "*" if c.kind == self.chosen else " "
            what = f"{c.tokens_per_s:,.1f} tokens/s" if c.tokens_per_s is not None else f"skipped: {c.skipped}"
            out.append(f" {mark} {c.name:<48} {what}")
        return out


# ---- building one backend ------------------------------------------------------------------------------------
def _adapters() -> list[dict]:
    import wgpu

    return [a.info for a in wgpu.gpu.enumerate_adapters_sync()]


def build_cpu(args: BuildArgs) -> TrainingBackend:
    from engine.backends.onnx import OnnxBackend

    return OnnxBackend(args.model_dir, args.lora, args.optim, args.batch_size, args.seq_len, seed=args.seed,
                       init_state=args.init_state, threads=args.threads)


def build_wgpu(args: BuildArgs, adapter: str | None, allow_software: bool) -> TrainingBackend:
    from engine.backends.wgpu.context import GpuContext, NoAdapterError

    try:
        ctx = GpuContext.create(adapter_name=adapter, allow_software=allow_software)
    except NoAdapterError as exc:
        hint = "" if allow_software else "; name a software adapter (--backend wgpu:<name>) to train on it anyway"
        raise ValueError(f"{exc}{hint}, or use --backend cpu") from exc
    try:
        from engine.backends.wgpu.backend import WgpuBackend
    except ImportError as exc:
        raise ValueError(f"the WGSL backend is not part of this installation ({exc}); use --backend cpu") from exc
    return WgpuBackend(args.model_dir, args.lora, args.optim, args.batch_size, args.seq_len, ctx=ctx,
                       lora_state=args.init_state, seed=args.seed, weights=args.memory.weights,
                       recompute=args.memory.recompute, math=args.memory.math)


def create_backend(kind: str, model_dir, lora: LoraConfig, optim: OptimizerConfig, batch_size: int,
                   seq_len: int, seed: int = 0, init_state: dict | None = None, measure_steps: int = 2,
                   threads: int | None = None,
                   memory: MemoryOptions = MemoryOptions()) -> tuple[TrainingBackend, BackendChoice | None]:
    """The backend `kind` names; for "auto" the fastest measured one and the BackendChoice report.

    `threads` caps the CPU backend's threads (the window's training process leaves a core to the event loop).
    `memory`: the WGSL backend's weight format and activation recompute (auto measures the WGSL candidates
    with them)."""
    base, adapter = parse_backend_kind(kind)
    args = BuildArgs(Path(model_dir), lora, optim, batch_size, seq_len, seed, init_state, threads, memory)
    if base == "cpu":
        return build_cpu(args), None
    if base == "wgpu":
        # Naming an adapter is the explicit request that allows a software one; plain "wgpu" does not.
        return build_wgpu(args, adapter, allow_software=adapter is not None), None
    return choose_backend(args, measure_steps)


# ---- measuring -----------------------------------------------------------------------------------------------
def measure(backend: TrainingBackend, steps: int, seed: int = 0) -> float:
    """Seconds per training step at the backend's full shape, after two warm-up steps (lr = 0).

    Two, because onnxruntime's arena still grows during its second run at larger shapes (the 135M model at
    B=2, T=512 on 2 cores: 6.5 s, 4.4 s, then 3.0 s a step), which made the CPU look 20% slower than it trains.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, backend.spec.vocab_size, (backend.batch_size, backend.seq_len)).astype(np.int32)
    batch = [(ids, ids.copy())]
    for _ in range(2):
        backend.train_step(batch, lr=0.0, max_grad_norm=1.0).result()
    start = time.perf_counter()
    for _ in range(steps):
        backend.train_step(batch, lr=0.0, max_grad_norm=1.0).result()
    return (time.perf_counter() - start) / steps


def candidates() -> tuple[list[Candidate], list[Candidate]]:
    """(to measure, skipped): every hardware wgpu adapter and the CPU; software adapters are skipped."""
    from engine.backends.hardware import adapter_is_software, cpu_model

    todo, skipped = [], []
    try:
        infos = _adapters()
    except Exception as exc:  # the wgpu-native library may fail to load at all
        infos = []
        skipped.append(Candidate("wgpu", "wgpu", skipped=f"no adapters: {exc}"))
    seen = set()
    for info in infos:
        name = info.get("device", "?")
        if info.get("backend_type") == "OpenGL" or name in seen:
            continue          # the same GPU through GL is slower than through Vulkan/Metal/D3D12
        seen.add(name)
        c = Candidate(f"wgpu:{name}", f"{name} ({info.get('backend_type', '?')})")
        if adapter_is_software(info):
            short = name.split(" (")[0]
            c.skipped = f"software adapter; name it (--backend wgpu:{short}) to train on it anyway"
            skipped.append(c)
        else:
            todo.append(c)
    todo.append(Candidate("cpu", f"onnxruntime on {cpu_model()}"))
    return todo, skipped


def choose_backend(args: BuildArgs, measure_steps: int = 2,
                   cache: bool = True) -> tuple[TrainingBackend, BackendChoice]:
    """Measure every candidate on throwaway instances, then build the fastest fresh (so the measured steps
    leave no trace in its weights or optimizer state). With `cache`, speeds measured before on this machine for
    the same model and run shape (engine.backends.measured) are used instead of measuring again."""
    from engine.backends import measured as speeds
    from engine.model.spec import load_model_spec

    todo, skipped = candidates()
    key = describe = None
    if cache:
        machine = speeds.machine_id([c.kind for c in todo if c.kind != "cpu"], args.threads)
        spec = load_model_spec(args.model_dir)
        key = speeds.run_key(machine, spec, args.lora, args.batch_size, args.seq_len, args.memory)
        describe = {"machine": machine, "model": speeds.model_shape(spec), "batch": args.batch_size,
                    "seq_len": args.seq_len, "rank": args.lora.rank}
        known = speeds.lookup(key)
        if known is not None and all(c.kind in known for c in todo):
            for c in todo:
                c.tokens_per_s = known[c.kind]
                c.seconds_per_step = args.batch_size * args.seq_len / c.tokens_per_s
            best = max(todo, key=lambda c: c.tokens_per_s)
            backend = build_cpu(args) if best.kind == "cpu" else \
                build_wgpu(args, best.kind[5:], allow_software=False)
            return backend, BackendChoice(best.kind, args.batch_size, args.seq_len, 0, todo + skipped, cached=True)
    measured = []
    for c in todo:
        try:
            backend = build_cpu(args) if c.kind == "cpu" else build_wgpu(args, c.kind[5:], allow_software=False)
        except (ValueError, RuntimeError, MemoryError, OSError) as exc:
            c.skipped = f"unavailable: {exc}"
            continue
        try:
            c.seconds_per_step = measure(backend, measure_steps)
            c.tokens_per_s = args.batch_size * args.seq_len / c.seconds_per_step
            measured.append(c)
        except (RuntimeError, MemoryError) as exc:
            c.skipped = f"failed while measuring: {exc}"
        finally:
            backend.close()
    if not measured:
        reasons = "; ".join(f"{c.kind}: {c.skipped}" for c in todo + skipped)
        raise RuntimeError(f"no training backend could run [{args.batch_size}, {args.seq_len}]: {reasons}")
    best = max(measured, key=lambda c: c.tokens_per_s)
    if key is not None and len(measured) == len(todo):     # a candidate that failed is measured again next time
        speeds.store(key, {c.kind: c.tokens_per_s for c in measured}, describe)
    backend = build_cpu(args) if best.kind == "cpu" else build_wgpu(args, best.kind[5:], allow_software=False)
    return backend, BackendChoice(best.kind, args.batch_size, args.seq_len, measure_steps, todo + skipped)
