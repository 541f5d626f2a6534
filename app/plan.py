"""The plan behind the wizard, without widgets: recommended settings, memory, ETA and warnings.

Recommendations come from the corpus that was actually read and the hardware that was detected; the memory is the
WGSL engine's own allocation plan (engine.backends.wgpu.memory) and the ETA divides the run's floating-point operations
(engine.backends.wgpu.microbench.step_flops) by a GFLOP/s figure measured by the Benchmark button. Nothing is guessed: where a
figure is missing (no benchmark yet, GPU memory unreadable) the review says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.lora.adalora import AdaLoraSettings
from engine.model.spec import ModelSpec
from engine.train.config import TrainConfig
# The defaults live in the engine, where `lora-lab train` reads them too; re-exported for the wizard.
from engine.train.recommend import (CorpusSummary, has_hardware_gpu, is_preference_corpus,  # noqa: F401
                                    recommend, summarize_corpus, total_steps)

MIN_TRAINED_TOKENS = 10_000      # below this a LoRA mostly memorises; worth a warning, not a refusal

# Adaptive rank (AdaLoRA) phases as fractions of the run: the first 10 % trains at the full initial rank so the
# importance scores measure something learned before anything is pruned (tinit), the last 20 % trains the final
# ranks undisturbed (tfinal), and the 70 % between moves the budget on PEFT's cubic schedule. These are the proportions
# of the worked example in PEFT's AdaLoraConfig docstring (tinit 10, tfinal 20, total_step 100); the AdaLoRA paper
# likewise spends a short warm-up and a longer final phase. deltaT stays PEFT's default 1: reallocating every step
# is a top-k over the triplets' scores, small beside a step, and follows the schedule most closely.
ADAPTIVE_WARMUP_FRACTION = 0.1
ADAPTIVE_FINAL_FRACTION = 0.2


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
    engine_bytes: int | None              # the WGSL engine's allocation for this run, as planned (GPU runs only)
    plan: object | None                   # engine.train.memory_fit.FitPlan: weights, recompute, micro-batch
    device_bytes: int | None              # what the chosen adapter has (NVML), None when unknown
    ram_available: int
    eta_s: float | None
    eta_basis: str
    warnings: list[str] = field(default_factory=list)
    runs_on: str = "gpu"                  # "cpu": the CPU backend (onnxruntime) will train; "gpu": a wgpu adapter


def adaptive_settings(init_r: int, target_r: int, steps: int) -> AdaLoraSettings:
    """PEFT's AdaLoRA settings for a run of `steps` optimizer steps: its defaults, with tinit and tfinal the fractions
    above (rounded down, so a short run still has a budgeting phase)."""
    return AdaLoraSettings(init_r=init_r, target_r=target_r, tinit=int(steps * ADAPTIVE_WARMUP_FRACTION),
                           tfinal=int(steps * ADAPTIVE_FINAL_FRACTION), total_step=steps)


def adaptive_description(settings: AdaLoraSettings, projections: int) -> str:
    """What an adaptive-rank run will do, in one sentence for the review page. `projections`: layers x targets."""
    s = settings
    return (f"Adaptive rank (AdaLoRA): every one of the {projections} projections starts at rank {s.init_r} "
            f"(total {s.init_r * projections}); after {s.tinit} steps the least important singular triplets are "
            f"pruned, on PEFT's cubic schedule until step {s.total_step - s.tfinal}, down to a total-rank budget of "
            f"{s.target_r * projections} (average {s.target_r}), moving rank to the projections that need it; the "
            f"last {s.tfinal} steps train the final ranks. The console shows the rank map; GGUF and merged exports "
            "take the kept triplets folded into plain LoRA with a rank per projection.")


def runs_on_cpu(backend: str, hardware, speeds: dict | None) -> bool:
    """Whether the CPU backend will train: named, or `auto` with no hardware GPU, or `auto` where the speeds
    measured before on this machine (engine.backends.measured) put the CPU first."""
    if backend == "cpu":
        return True
    if backend != "auto":
        return False
    if not has_hardware_gpu(hardware):
        return True
    rates = (speeds or {}).get("tokens_per_s") or {}
    return bool(rates) and max(rates, key=rates.get) == "cpu"


def review(config: TrainConfig, spec: ModelSpec, summary: CorpusSummary, val_split: float, hardware,
           benchmarks: list[Benchmark], backend: str = "auto", speeds: dict | None = None) -> Review:
    """What the run will take. `speeds`: engine.backends.measured.latest_for(spec), the backends' tokens/s
    measured by an earlier run on this machine, which gives the ETA without a benchmark."""
    steps = total_steps(config, summary.examples(config), val_split)
    adapter = next((a for a in hardware.adapters if not a.software and a.backend != "OpenGL"), None) \
        if hardware is not None else None
    ram = hardware.ram_available_bytes if hardware is not None else 0
    device = adapter.memory_bytes if adapter is not None else None
    cpu = runs_on_cpu(backend, hardware, speeds)
    warnings = []
    plan = None
    if not cpu:
        try:
            # The same plan the run will make (engine.train.runs.plan_memory): weights, recompute, micro-batch.
            from engine.model.weights import open_weights
            from engine.train.memory_fit import fit_plan, usable_budget

            limit = (adapter.limits.get("max-storage-buffer-binding-size") if adapter else None) or (1 << 31) - 4
            stored = {n: t.format for n, t in open_weights(spec.source).stored().items()}
            plan = fit_plan(spec, config.lora, config.optim, config.batch_size, config.seq_len,
                            usable_budget(device), weights=config.weights, recompute=config.recompute,
                            stored=stored, grad_accum=config.grad_accum, max_binding_bytes=limit)
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
    eta, basis = _eta(config, spec, steps, plan, benchmarks, backend, cpu, speeds)
    cost, why = preference_step_cost(config)
    if eta is not None and cost != 1.0:
        eta, basis = eta * cost, f"{basis}; {why}"
    return Review(steps, engine_bytes, plan, device, ram, eta, basis, warnings, "cpu" if cpu else "gpu")


def preference_step_cost(config: TrainConfig) -> tuple[float, str]:
    """A step's time relative to an SFT step over the same tokens, and why, counted in forward passes (a backward
    costs about two): SFT 3; ORPO adds the policy's log-probability pass, 4; DPO also the reference's, 5 (4 once
    the reference is cached, engine.train.reference: the figure is an upper bound). bench/preference_step.py
    measures the real ratios."""
    if config.objective == "dpo":
        return 5 / 3, "a DPO step counted as 5/3 of an SFT step (the policy's and the reference's forward passes)"
    if config.objective == "orpo":
        return 4 / 3, "an ORPO step counted as 4/3 of an SFT step (the policy's log-probability pass)"
    return 1.0, ""


def _eta(config, spec, steps, plan, benchmarks, backend, cpu, speeds) -> tuple[float | None, str]:
    """(seconds, where the figure comes from): the speed an earlier run measured on this machine for this model
    (scaled by tokens when its shape differed), else the Benchmark button's GFLOP/s, else unknown."""
    tokens = config.batch_size * config.grad_accum * config.seq_len
    rates = dict((speeds or {}).get("tokens_per_s") or {})
    kind = "cpu" if cpu else backend if backend.startswith("wgpu:") else \
        max((k for k in rates if k != "cpu"), key=rates.get, default=None)
    if kind in rates and rates[kind] > 0:
        shape = f"[{speeds.get('batch')}, {speeds.get('seq_len')}]"
        same = (speeds.get("batch"), speeds.get("seq_len")) == (config.batch_size, config.seq_len)
        return steps * tokens / rates[kind], (f"{kind}: {rates[kind]:,.0f} tokens/s measured by an earlier run "
                                              f"on {shape}" + ("" if same else ", scaled to this shape"))
    usable = [b for b in benchmarks if not b.software and b.gflops > 0 and (b.kind == "cpu") == cpu]
    if usable:
        from engine.backends.wgpu.microbench import step_flops

        best = max(usable, key=lambda b: b.gflops)
        recompute = plan.recompute if plan is not None else bool(config.recompute)
        eta = steps * step_flops(spec, config.lora, tokens, config.seq_len, recompute) / (best.gflops * 1e9)
        return eta, f"{best.name}: {best.gflops:.1f} GFLOP/s measured"
    return None, ("not measured on this machine yet: the first run measures the backends and the next plan "
                  "shows an ETA (or press Benchmark in the hardware inspector)")


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
