"""The plan behind the wizard, without widgets: recommended settings, memory, ETA and warnings.

Recommendations come from the corpus that was actually read and the hardware that was detected; the memory is the
WGSL engine's own allocation plan (engine.backends.wgpu.memory) and the ETA divides the run's floating-point operations
(engine.backends.wgpu.microbench.step_flops) by a GFLOP/s figure measured by the Benchmark button. Nothing is guessed: where a
figure is missing (no benchmark yet, GPU memory unreadable) the review says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.model.spec import ModelSpec
from engine.train.config import TrainConfig
# The defaults live in the engine, where `lora-lab train` reads them too; re-exported for the wizard.
from engine.train.recommend import CorpusSummary, recommend, summarize_corpus, total_steps  # noqa: F401

MIN_TRAINED_TOKENS = 10_000      # below this a LoRA mostly memorises; worth a warning, not a refusal


@dataclass(frozen=True)
class Benchmark:
    """Measured speed of one candidate backend: `kind` as engine.backends.choose names it (cpu, wgpu:<adapter>)."""

    kind: str
    name: str
    gflops: float
    software: bool = False
    detail: str = ""


@dataclass
class Review:
    steps: int
    engine_bytes: int | None              # the WGSL engine's allocation for this run, as planned
    plan: object | None                   # engine.train.memory_fit.FitPlan: weights, recompute, micro-batch
    device_bytes: int | None              # what the chosen adapter has (NVML), None when unknown
    ram_available: int
    eta_s: float | None
    eta_basis: str
    warnings: list[str] = field(default_factory=list)


def review(config: TrainConfig, spec: ModelSpec, summary: CorpusSummary, val_split: float, hardware,
           benchmarks: list[Benchmark]) -> Review:
    steps = total_steps(config, summary.sequences, val_split)
    adapter = next((a for a in hardware.adapters if not a.software and a.backend != "OpenGL"), None) \
        if hardware is not None else None
    ram = hardware.ram_available_bytes if hardware is not None else 0
    device = adapter.memory_bytes if adapter is not None else None
    warnings = []
    plan = None
    try:
        # The same plan the run will make (engine.train.runs.plan_memory): weights, recompute, micro-batch.
        from engine.model.weights import open_weights
        from engine.train.memory_fit import fit_plan, usable_budget

        limit = (adapter.limits.get("max-storage-buffer-binding-size") if adapter else None) or (1 << 31) - 4
        stored = {n: t.format for n, t in open_weights(spec.source).stored().items()}
        plan = fit_plan(spec, config.lora, config.optim, config.batch_size, config.seq_len, usable_budget(device),
                        weights=config.weights, recompute=config.recompute, stored=stored,
                        grad_accum=config.grad_accum, max_binding_bytes=limit)
    except ValueError as exc:   # does not fit (the message has the numbers), or a shape the planner refuses
        warnings.append(str(exc))
    except OSError:             # weights unreadable: the review says memory is unknown
        pass
    engine_bytes = plan.memory.total if plan is not None else None
    if summary.trainable_tokens < MIN_TRAINED_TOKENS:
        warnings.append(f"little data: {summary.trainable_tokens:,} trained tokens (under {MIN_TRAINED_TOKENS:,}); "
                        "the adapter will mostly memorise these examples")
    if engine_bytes is not None:
        budget = device if device is not None else ram
        if engine_bytes > budget:
            where = "GPU memory" if device is not None else "available RAM"
            warnings.append(f"too much memory: the run needs {engine_bytes / 2**30:.2f} GiB, {where} is "
                            f"{budget / 2**30:.2f} GiB; lower the batch size or sequence length")
    if hardware is not None and adapter is None:
        software = [a.name for a in hardware.adapters if a.software]
        warnings.append("no hardware GPU: " + (f"only the software adapter {software[0]}; " if software else "")
                        + "training runs on the CPU backend (onnxruntime), which is slower")
    if summary.longest > config.seq_len:
        warnings.append(f"sequence length {config.seq_len} is shorter than the longest example "
                        f"({summary.longest} tokens): longer ones are cut")
    eta, basis = None, "no benchmark yet: run Benchmark in the hardware inspector for an ETA"
    usable = [b for b in benchmarks if not b.software and b.gflops > 0]
    if usable:
        from engine.backends.wgpu.microbench import step_flops

        best = max(usable, key=lambda b: b.gflops)
        tokens = config.batch_size * config.grad_accum * config.seq_len
        recompute = plan.recompute if plan is not None else bool(config.recompute)
        eta = steps * step_flops(spec, config.lora, tokens, config.seq_len, recompute) / (best.gflops * 1e9)
        basis = f"{best.name}: {best.gflops:.1f} GFLOP/s measured"
    return Review(steps, engine_bytes, plan, device, ram, eta, basis, warnings)



def backend_explanation(hardware, benchmarks: list[Benchmark]) -> str:
    """Which backend `auto` will train on, and why, from what was detected and measured."""
    hardware_gpus = [a for a in (hardware.adapters if hardware else ()) if not a.software and a.backend != "OpenGL"]
    software = [a.name for a in (hardware.adapters if hardware else ()) if a.software]
    candidates = [b for b in benchmarks if not b.software and b.gflops > 0]
    if candidates:
        best = max(candidates, key=lambda b: b.gflops)
        others = ", ".join(f"{b.name} {b.gflops:.1f}" for b in candidates if b is not best)
        return (f"training will use {best.name}: the fastest measured ({best.gflops:.1f} GFLOP/s"
                + (f"; others: {others}" if others else "") + ")"
                + (f". Software adapters ({', '.join(software)}) are never picked automatically." if software else ""))
    why = (f"{len(hardware_gpus)} hardware GPU(s) and the CPU are measured when a run starts, the fastest is used"
           if hardware_gpus else "no hardware GPU was found, so training uses the CPU backend (onnxruntime)")
    if software:
        why += f"; software adapters ({', '.join(software)}) are never picked automatically"
    return why + ". Press Benchmark to measure now."
