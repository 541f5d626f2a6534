"""bench/architectures.py --quick runs end to end (tiny Gemma 2 on lavapipe, PEFT on the CPU) and reports JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "architectures.py"


@pytest.mark.gpu
def test_quick_bench_reports_ours_and_peft(capsys, gpu_device):
    spec = importlib.util.spec_from_file_location("bench_architectures", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--models", "gemma2", "--batch-sizes", "1", "--steps", "1", "--weights",
                       "f32"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert (row["model"], row["batch_size"], report["seq_len"]) == ("gemma2", 1, 24)
    assert row["ours_f32"]["tokens_per_s"] > 0 and row["ours_f32"]["engine_bytes"] > 0
    assert row["peft_bf16"]["attention"] == "eager"
    assert row["speed_ratio_f32_vs_peft_bf16"] == row["ours_f32"]["tokens_per_s"] / row["peft_bf16"]["tokens_per_s"]
    # The same model and data: both start from the same loss (bf16 against f32 arithmetic).
    assert abs(row["ours_f32"]["last_loss"] - row["peft_bf16"]["last_loss"]) < 0.1
