"""bench/handover.py runs end to end (small shape, CPU) and reports what it measured as JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "handover.py"


def test_bench_reports_the_handover(capsys):
    spec = importlib.util.spec_from_file_location("bench_handover", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--shape", "small", "--repeats", "1", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["device"] == "cpu" and report["model"]["parameters"] > 2_000_000
    run = report["repeats"][0]
    assert run["training"].startswith("placeholder")
    assert run["active_adapter_after"] == run["adapters_after"][1] != "previous"
    assert [step["to"] for step in run["handover"][:4]] == ["unloading", "training", "reloading", "idle"]
    for key in ("unload_to_training_start_s", "unload_to_training_ready_s", "training_done_to_chat_ready_s"):
        assert 0 < run[key] < 30 and report["median"][key] == run[key]
    assert report["answer"]["stop_latency_s"] < 0.1
