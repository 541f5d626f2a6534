"""The plan behind the wizard, without widgets: recommended settings, memory, ETA and warnings.

Recommendations come from the corpus that was actually read and the hardware that was detected; the memory is the
WGSL engine's own allocation plan (engine.backends.wgpu.memory) and the ETA divides the run's floating-point operations
(engine.backends.wgpu.microbench.step_flops) by a GFLOP/s figure measured by the Benchmark button. Nothing is guessed: where a
figure is missing (no benchmark yet, GPU memory unreadable) the review says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.lora.config import LoraConfig
from engine.model.spec import ModelSpec
from engine.train.config import TrainConfig

MIN_TRAINED_TOKENS = 10_000      # below this a LoRA mostly memorises; worth a warning, not a refusal


@dataclass(frozen=True)
class Benchmark:
    """Measured speed of one candidate backend: `kind` as engine.backends.choose names it (cpu, wgpu:<adapter>)."""

    kind: str
    name: str
    gflops: float
    software: bool = False
    detail: str = ""


@dataclass(frozen=True)
class CorpusSummary:
    files: tuple[str, ...]
    sequences: int
    trainable_tokens: int
    longest: int                 # longest training sequence, tokens
    seq_len: int                 # the sequence length the corpus was read with


def summarize_corpus(corpus) -> CorpusSummary:
    lengths = [len(s) for s in corpus.train]
    return CorpusSummary(tuple(f.path for f in corpus.stats.files if f.split == "train" and f.refused is None),
                         len(corpus.train), sum(s.trainable_tokens for s in corpus.train),
                         max(lengths, default=0), corpus.config.seq_len)


def recommend(summary: CorpusSummary, spec: ModelSpec, has_hardware_gpu: bool) -> tuple[TrainConfig, float]:
    """(TrainConfig, validation fraction) suited to this much data on this hardware."""
    seq_len = 32
    while seq_len < summary.longest and seq_len < 1024:
        seq_len *= 2
    seq_len = min(seq_len, spec.max_sequence_length)     # a sliding window caps what is computed exactly
    n = max(summary.sequences, 1)
    val_split = 0.1 if n >= 20 else 0.0
    train_n = max(1, n - int(n * val_split))
    batch = max(1, min(8 if has_hardware_gpu else 4, train_n))
    # Small corpora need several passes to move the loss; large ones one pass (more only overfits).
    epochs = 3 if train_n < 200 else 2 if train_n < 2000 else 1
    steps = epochs * math.ceil(train_n / batch)
    # No dropout by default, as in PEFT; both backends (WGSL and onnxruntime) train with it if the Method page
    # sets it.
    lora = LoraConfig(rank=16, alpha=32.0, dropout=0.0)
    config = TrainConfig(lora=lora, batch_size=batch, seq_len=seq_len, epochs=epochs, lr=2e-4, schedule="cosine",
                         warmup_steps=max(0, round(0.05 * steps)), eval_every=max(1, steps // 4))
    return config, val_split


def total_steps(config: TrainConfig, sequences: int, val_split: float) -> int:
    train_n = max(1, sequences - int(sequences * val_split))
    per_epoch = math.ceil(math.ceil(train_n / config.batch_size) / config.grad_accum)
    return config.max_steps or config.epochs * per_epoch


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
