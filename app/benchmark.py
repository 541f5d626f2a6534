"""The Benchmark button's work: measure each wgpu adapter (engine.backends.wgpu.microbench) and the CPU backend on the model.

run_benchmarks runs in a worker thread and each measurement in a child process; it returns app.plan.Benchmark
records the wizard turns into an ETA.
"""
from __future__ import annotations

from pathlib import Path

from app.plan import Benchmark

CPU_SHAPE = (1, 64)     # [batch, tokens] of the CPU measurement: quick, yet a real training step


def benchmark_adapters(hardware, progress=None) -> list[Benchmark]:
    """GEMM GFLOP/s of every wgpu adapter (software ones included: the user asked; they are marked)."""
    from engine.backends.wgpu.context import GpuContext
    from engine.backends.wgpu.microbench import measure, tiny_spec

    tiny = tiny_spec()
    out = []
    for adapter in (hardware.adapters if hardware is not None else ()):
        if adapter.backend == "OpenGL":
            continue
        if progress is not None:
            progress(f"measuring {adapter.name} ({adapter.backend})")
        try:
            result = measure(GpuContext.create(adapter_name=adapter.name, allow_software=True), quick=True)
        except Exception as exc:  # one adapter failing must not hide the others
            out.append(Benchmark(f"wgpu:{adapter.name}", f"{adapter.name} ({adapter.backend})", 0.0,
                                 adapter.software, f"failed: {exc}"))
            continue
        training, n = result["training"], result["matmul_size"]
        # Two figures of different things: the GFLOP/s column is the GEMM's; the tokens/s are of a model much
        # smaller than the loaded one, so they are not comparable with the CPU's tokens/s on the loaded model.
        out.append(Benchmark(f"wgpu:{adapter.name}", f"{adapter.name} ({adapter.backend})",
                             float(result["matmul_gflops"]), adapter.software,
                             f"GFLOP/s of the engine's GEMM, {n}×{n}×{n} float32; training a built-in tiny test "
                             f"model (not the loaded one: {tiny.model_type}, hidden {tiny.hidden}, {tiny.layers} "
                             f"layers, {tiny.parameter_count() / 1e6:.1f} M parameters), LoRA rank 8, batch "
                             f"{training['batch_size']} x {training['seq_len']} tokens: "
                             f"{training['tokens_per_s']:.0f} tokens/s"))
    return out


def benchmark_cpu(model_dir: Path | None, progress=None) -> Benchmark:
    """A real training step of the CPU backend (onnxruntime) on the loaded model, as GFLOP/s."""
    from engine.backends.base import OptimizerConfig
    from engine.backends.choose import BuildArgs, build_cpu, measure
    from engine.backends.hardware import cpu_model
    from engine.lora.config import LoraConfig
    from engine.backends.wgpu.microbench import step_flops
    from engine.model.spec import load_model_spec

    name = f"CPU: onnxruntime on {cpu_model()}"
    if model_dir is None:
        return Benchmark("cpu", name, 0.0, detail="load a model first: the CPU is measured on the model itself")
    if progress is not None:
        progress("measuring the CPU backend on the model")
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=8, alpha=16.0)
    batch, tokens = CPU_SHAPE
    backend = build_cpu(BuildArgs(Path(model_dir), lora, OptimizerConfig(), batch, tokens))
    try:
        seconds = measure(backend, steps=2)
    finally:
        backend.close()
    gflops = step_flops(spec, lora, batch * tokens, tokens) / seconds / 1e9
    return Benchmark("cpu", name, gflops, detail=f"training the loaded model ({spec.model_type}, "
                                                  f"{spec.parameter_count() / 1e6:.0f} M parameters), LoRA rank 8, "
                                                  f"batch {batch} x {tokens} tokens: {batch * tokens / seconds:.0f} "
                                                  "tokens/s; GFLOP/s of those whole training steps")


def run_benchmarks(hardware, model_dir: Path | None, progress=None) -> list[Benchmark]:
    """Every measurement, each in a child process: building backends holds the GIL in long native calls, which
    would freeze the window if done in one of its threads."""
    from app.training_process import run_in_child

    if progress is not None:
        progress("measuring the wgpu adapters")
    adapters = run_in_child(benchmark_adapters, hardware)
    if progress is not None:
        progress("measuring the CPU backend on the model")
    return [*adapters, run_in_child(benchmark_cpu, model_dir)]
