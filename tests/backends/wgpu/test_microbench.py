"""The micro-benchmark measures (does not estimate) and the throughput bench runs end to end with --quick."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.lora.config import LoraConfig
from engine.backends.wgpu.microbench import measure, random_weights, smollm2_135m_spec, step_flops, tiny_spec

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[3]


def test_measure_reports_positive_measured_rates(gpu_device):
    report = measure(gpu_device, quick=True)
    assert report["adapter"] == gpu_device.label
    assert report["matmul_gflops"] > 0
    training = report["training"]
    assert training["tokens_per_s"] > 0 and training["ms_per_step"] > 0
    assert np.isfinite(training["last_loss"]) and training["engine_bytes"] > 0


def test_random_weights_cover_every_uploaded_tensor():
    spec = tiny_spec()
    tensors = random_weights(spec)
    assert len(tensors) == 2 + 9 * spec.layers
    assert tensors["model.norm.weight"].tolist() == [1.0] * spec.hidden


def test_step_flops_is_dominated_by_dense_matmuls_for_smollm2():
    spec = smollm2_135m_spec()
    flops = step_flops(spec, LoraConfig(rank=16, alpha=32), tokens=512, seq_len=512)
    dense_params = spec.parameter_count() - spec.vocab_size * spec.hidden
    assert 4 * dense_params * 512 < flops < 12 * spec.parameter_count() * 512


@pytest.mark.slow
def test_train_throughput_bench_quick_prints_json():
    """JSON lines: the header, one line per measurement (ours in f32 and f16 math, the PyTorch + PEFT modes, on
    the CPU here: the real comparison runs on CUDA), then the summary with the ratios."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--quick", "--torch-device",
                          "cpu", "--batch-sizes", "1", "--steps", "1", "--ours", "f32/f32", "bf16/f16"],
                         capture_output=True, text=True, check=True, timeout=300)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    header, rows, last = lines[0], lines[1:-1], lines[-1]
    assert header["machine"]["adapter"]
    assert [(r["who"], r["config"]) for r in rows] == [("ours", "f32/f32"), ("ours", "bf16/f16"), ("peft", "fp32"),
                                                        ("peft", "bf16-autocast"), ("peft", "bf16")]
    assert all(r["result"]["tokens_per_s"] > 0 for r in rows), rows
    cell = last["summary"][0]
    best = max(rows[2:], key=lambda r: r["result"]["tokens_per_s"])
    assert cell["peft_best"] == best["config"]
    assert cell["ratio_f32_vs_best_peft"] == rows[0]["result"]["tokens_per_s"] / best["result"]["tokens_per_s"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["matmul.py", "step_profile.py"])
def test_tuning_benches_quick_print_json(script):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--batch-sizes", "1"],
                         capture_output=True, text=True, check=True, timeout=300)
    if script == "matmul.py":
        report = json.loads(out.stdout)
        assert report["machine"]["adapter"] and report["results"]
        row = report["results"][0]
        assert all(row[v]["gflops"] > 0 for v in ("auto", "64x64", "128x64", "128x128", "auto_f16math"))
    else:   # JSON lines: the header, one line per (model, batch, configuration), the end
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert lines[0]["machine"]["adapter"] and lines[-1]["done"]
        rows = lines[1:-1]
        assert [(r["config"], r["f16_products"]) for r in rows] == [("f32/f32", 0), ("bf16/f16", 15)]   # 7·2 + head
        phases = ("forward", "forward_frozen_linears", "attention_forward", "lm_head", "backward",
                  "backward_frozen_linears", "backward_lora", "attention_backward", "optimizer")
        assert all(r[p]["ms"] > 0 and r[p]["dispatches"] > 0 for r in rows for p in phases)


def test_cpu_profile_counts_the_frozen_gemm_flops_of_the_training_graph(tiny_llama_dir):
    """bench/cpu_profile.py's closed-form FLOP count equals 2·rows·|W| summed over the graph's frozen GEMMs."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_profile import FROZEN_GEMM_HINTS, frozen_gemm_flops

    from engine.model.spec import load_model_spec
    from engine.model.weights import open_weights
    from engine.backends.onnx.model_graph import DecoderGraph, GraphShape, prepare_weights

    spec = load_model_spec(tiny_llama_dir)
    weights = prepare_weights(spec, open_weights(tiny_llama_dir))
    shape = GraphShape(2, 7)
    graph = DecoderGraph(spec, weights, LoraConfig(rank=4, alpha=8), shape).build("train")
    counted = sum(2 * shape.rows * weights[name].size for node in graph.nodes
                  if node.output[0].rsplit("_", 1)[0] in FROZEN_GEMM_HINTS
                  for name in node.input if name in weights)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert counted == frozen_gemm_flops(config, shape.rows) > 0


@pytest.mark.slow
def test_cpu_profile_quick_prints_json():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_profile.py"), "--quick", "--steps", "1",
                          "--skip", "1"], capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(out.stdout)
    assert report["step_ms_median"] > 0 and report["frozen_gemm_gflops_per_s"] > 0
    assert set(report["kernel_ms_by_kind"]) == {"frozen GEMMs", "LoRA GEMMs", "attention GEMMs",
                                                "elementwise, norms, layout"}


@pytest.mark.slow
def test_cpu_backend_bench_quick_runs_both_sides_on_the_same_step():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_backend.py"), "--quick", "--steps", "1",
                          "--rounds", "1"], capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(out.stdout)
    first = report["first_step_loss"]
    assert abs(first["ours"] - first["peft"]) <= 1e-5 * first["peft"]       # same model, batch and LoRA init
    ours, peft = report["ours"]["s_per_step_median"], report["peft_fp32"]["s_per_step_median"]
    assert report["ratio_ours_over_peft"] == peft / ours


def test_recompute_adds_most_of_a_forward_pass():
    """Recompute re-runs L−1 layers' forward, less down_proj: about 28% more work at SmolLM2-135M's shape,
    T = 512 (a full forward would be about 50%: frozen weights get no weight gradient)."""
    spec, lora = smollm2_135m_spec(), LoraConfig(rank=16, alpha=32)
    kept, recomputed = (step_flops(spec, lora, 512, 512, recompute=r) for r in (False, True))
    assert 1.25 < recomputed / kept < 1.31
    one_layer = dataclasses.replace(spec, layers=1)
    assert step_flops(one_layer, lora, 512, 512, recompute=True) == step_flops(one_layer, lora, 512, 512)
