"""`lora-lab plan`: the memory a run needs and the plan that fits a GPU, or a refusal with the numbers."""
import json

from engine.cli import main


def test_plan_prints_the_fitted_plan_as_json(tiny_llama_dir, capsys):
    assert main(["plan", "--model", str(tiny_llama_dir), "--gpu-memory", "8GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == "bf16" and out["recompute"] is False and out["micro_batch"] == 8
    assert out["gpu_memory_bytes"] == 8 * 2 ** 30 and 0 < out["memory"]["total"] <= out["budget_bytes"]


def test_a_budget_too_small_is_refused_in_one_line(tiny_llama_dir, capsys):
    assert main(["plan", "--model", str(tiny_llama_dir), "--gpu-memory", "100KB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab plan: error: the run does not fit") and "\n" not in err
