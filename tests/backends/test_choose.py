"""--backend auto|cpu|wgpu|wgpu:<name>: parsing, candidates (software adapters only when named), the measured
choice, and the `lora-lab backends` command."""
import json
import time

import numpy as np
import pytest

import engine.backends.choose as backends
from engine.backends.base import MemoryOptions, OptimizerConfig
from engine.backends.choose import BuildArgs, choose_backend, create_backend, parse_backend_kind
from engine.lora.config import LoraConfig, init_lora_state
from engine.model.spec import load_model_spec

LORA = LoraConfig(rank=4, alpha=8)


def test_parse_backend_kind():
    assert parse_backend_kind("auto") == ("auto", None)
    assert parse_backend_kind("cpu") == ("cpu", None)
    assert parse_backend_kind("wgpu") == ("wgpu", None)
    assert parse_backend_kind("wgpu: RTX 4090") == ("wgpu", "RTX 4090")
    for bad in ("gpu", "wgpu:", "", "cuda"):
        with pytest.raises(ValueError, match="auto, cpu, wgpu"):
            parse_backend_kind(bad)


def fake_adapters(monkeypatch, infos):
    monkeypatch.setattr(backends, "_adapters", lambda: infos)


LAVAPIPE = {"device": "llvmpipe (LLVM 15.0.7, 256 bits)", "adapter_type": "CPU", "backend_type": "Vulkan"}
GHOST_GPU = {"device": "Ghost GPU 9000", "adapter_type": "DiscreteGPU", "backend_type": "Vulkan"}


def test_software_adapters_are_never_candidates(monkeypatch):
    fake_adapters(monkeypatch, [LAVAPIPE, GHOST_GPU, dict(GHOST_GPU, backend_type="OpenGL")])
    todo, skipped = backends.candidates()
    assert [c.kind for c in todo] == ["wgpu:Ghost GPU 9000", "cpu"]
    assert [c.kind for c in skipped] == [f"wgpu:{LAVAPIPE['device']}"]
    assert "software adapter" in skipped[0].skipped and "--backend wgpu:llvmpipe" in skipped[0].skipped


def test_auto_measures_and_returns_a_fresh_cpu_backend(tiny_llama_dir, monkeypatch):
    """Here the only hardware 'adapter' cannot be opened: it is reported unavailable, the CPU is measured."""
    fake_adapters(monkeypatch, [LAVAPIPE, GHOST_GPU])
    args = BuildArgs(tiny_llama_dir, LORA, OptimizerConfig(), 2, 8, seed=3)
    backend, choice = choose_backend(args, measure_steps=1)
    with backend:
        assert choice.chosen == "cpu" and backend.name.startswith("cpu: onnxruntime")
        by_kind = {c.kind: c for c in choice.candidates}
        assert by_kind["cpu"].tokens_per_s > 0 and by_kind["cpu"].skipped is None
        assert by_kind["cpu"].tokens_per_s == pytest.approx(16 / by_kind["cpu"].seconds_per_step)
        assert by_kind["wgpu:Ghost GPU 9000"].skipped.startswith("unavailable")
        assert by_kind["wgpu:Ghost GPU 9000"].tokens_per_s is None
        assert "software adapter" in by_kind[f"wgpu:{LAVAPIPE['device']}"].skipped
        # The measured steps happened on a throwaway instance: the chosen one starts untouched.
        assert int(backend.optimizer_state()["step"]) == 0 and not backend.optimizer_state()["m"].any()
        expected = init_lora_state(load_model_spec(tiny_llama_dir), LORA, 3)
        assert all(np.array_equal(v, expected[k]) for k, v in backend.lora_state().items())
        text = "\n".join(choice.lines())
        assert "* onnxruntime" in text and "tokens/s" in text and "skipped: software adapter" in text


def test_auto_picks_the_fastest_measured_candidate(tiny_llama_dir, monkeypatch):
    """Selection logic alone: two openable candidates with known step times."""
    fake_adapters(monkeypatch, [GHOST_GPU])
    built = []

    def fake_wgpu(args, adapter, allow_software):
        assert adapter == "Ghost GPU 9000" and not allow_software
        built.append(adapter)
        return backends.build_cpu(args)

    times = iter([0.5, 2.0])        # the GPU candidate is measured first
    monkeypatch.setattr(backends, "build_wgpu", fake_wgpu)
    monkeypatch.setattr(backends, "measure", lambda backend, steps: next(times))
    backend, choice = choose_backend(BuildArgs(tiny_llama_dir, LORA, OptimizerConfig(), 1, 8), measure_steps=1)
    backend.close()
    assert choice.chosen == "wgpu:Ghost GPU 9000" and built == ["Ghost GPU 9000"] * 2
    assert [c.tokens_per_s for c in choice.candidates] == [16.0, 4.0]


def test_plain_wgpu_refuses_a_software_adapter(tiny_llama_dir, monkeypatch):
    from engine.backends.wgpu.context import GpuContext, NoAdapterError

    def only_software(adapter_name=None, allow_software=True):
        assert not allow_software
        raise NoAdapterError("only a software adapter is present (llvmpipe)")

    monkeypatch.setattr(GpuContext, "create", staticmethod(only_software))
    with pytest.raises(ValueError, match="--backend wgpu:<name>.*--backend cpu"):
        create_backend("wgpu", tiny_llama_dir, LORA, OptimizerConfig(), 1, 8)


def test_cpu_kind_builds_the_onnx_backend(tiny_llama_dir):
    backend, choice = create_backend("cpu", tiny_llama_dir, LORA, OptimizerConfig(), 1, 8)
    with backend:
        assert choice is None and backend.name.startswith("cpu: onnxruntime")


def test_backends_command(tiny_llama_dir, capsys):
    from engine.cli import main

    assert main(["backends", str(tiny_llama_dir), "--backend", "cpu", "--seq-len", "8", "--rank", "2",
                 "--steps", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_per_s"] > 0 and report["name"].startswith("cpu: onnxruntime")
    with pytest.raises(SystemExit) as exc:
        main(["backends", str(tiny_llama_dir), "--backend", "tpu"])
    assert exc.value.code == 2
    assert "auto, cpu, wgpu" in capsys.readouterr().err


def test_real_adapters_software_ones_are_only_skipped():
    from engine.backends.hardware import adapter_is_software

    todo, skipped = backends.candidates()
    assert todo[-1].kind == "cpu"
    infos = {f"wgpu:{i['device']}": i for i in backends._adapters()}
    assert not any(adapter_is_software(infos[c.kind]) for c in todo if c.kind in infos)
    assert all("software adapter" in c.skipped for c in skipped if c.kind in infos)


def test_backends_command_auto_reports_every_candidate(tiny_llama_dir, capsys, monkeypatch):
    from engine.cli import main

    fake_adapters(monkeypatch, [LAVAPIPE])
    assert main(["backends", str(tiny_llama_dir), "--seq-len", "8", "--rank", "2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backend: cpu (measured on [1, 8], 1 steps each)")
    assert "tokens/s" in out and "skipped: software adapter" in out


def test_measure_times_only_the_steps_after_two_warm_ups():
    """onnxruntime's arena still grows in its second run: neither of the first two steps is timed."""
    from types import SimpleNamespace

    from engine.backends.base import PendingStep, StepResult

    durations = iter([0.30, 0.20, 0.01, 0.01, 0.01])

    class Fake:
        spec, batch_size, seq_len = SimpleNamespace(vocab_size=11), 1, 4

        def train_step(self, batch, lr, max_grad_norm):
            assert lr == 0.0
            time.sleep(next(durations))
            return PendingStep.done(StepResult(0, 1.0, 3, 1.0, False))

    seconds = backends.measure(Fake(), steps=3)
    assert 0.01 <= seconds < 0.1
    assert next(durations, None) is None


@pytest.mark.parametrize("memory", [MemoryOptions(), MemoryOptions(weights="bf16", recompute=True)])
def test_wgpu_kind_passes_the_memory_options(tiny_llama_dir, gpu_device, memory):
    """create_backend(memory=...) builds the WGSL backend with that weight format and recompute: the plan's
    byte count for them."""
    from engine.backends.wgpu.memory import memory_plan

    spec = load_model_spec(tiny_llama_dir)
    backend, _ = create_backend(f"wgpu:{gpu_device.label}", tiny_llama_dir, LORA, OptimizerConfig(), 2, 9,
                                memory=memory)
    with backend:
        plan = memory_plan(spec, LORA, OptimizerConfig(), 2, 9, backend.ctx.max_binding_bytes,
                           backend.ctx.max_workgroups, weights=memory.weights, recompute=memory.recompute)
        assert backend.recompute is memory.recompute and backend.weight_choice == memory.weights
        assert backend.memory_bytes() == plan.total


def test_auto_reuses_speeds_measured_before_for_the_same_machine_and_shape(tiny_llama_dir, monkeypatch):
    """The second run of the same shape measures nothing (the console's minute of '—' before the first step);
    another batch shape measures again."""
    fake_adapters(monkeypatch, [GHOST_GPU])
    monkeypatch.setattr(backends, "build_wgpu", lambda args, adapter, allow_software: backends.build_cpu(args))
    times = iter([0.5, 2.0])
    monkeypatch.setattr(backends, "measure", lambda backend, steps: next(times))
    first_backend, first = choose_backend(BuildArgs(tiny_llama_dir, LORA, OptimizerConfig(), 1, 8), 1)
    first_backend.close()
    assert not first.cached

    def no_measuring(backend, steps):
        raise AssertionError("measured again although the speeds were cached")

    monkeypatch.setattr(backends, "measure", no_measuring)
    backend, again = choose_backend(BuildArgs(tiny_llama_dir, LORA, OptimizerConfig(), 1, 8), 1)
    backend.close()
    assert again.cached and again.chosen == first.chosen == "wgpu:Ghost GPU 9000"
    assert [c.tokens_per_s for c in again.candidates] == [16.0, 4.0]
    assert "measured earlier" in again.lines()[0]
    with pytest.raises(AssertionError, match="measured again"):
        choose_backend(BuildArgs(tiny_llama_dir, LORA, OptimizerConfig(), 2, 8), 1)
