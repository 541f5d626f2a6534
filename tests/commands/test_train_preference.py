"""`lora-lab train --objective dpo|orpo` end to end on the tiny Llama with the CPU backend: a synthetic preference
set whose chosen answers always carry a marker the rejected ones lack."""
import json

import numpy as np
import pytest

from engine.cli import main

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def preference_file(path, n=48):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        a, b = rng.choice(WORDS, 2, replace=False)
        prompt = [{"role": "user", "content": f"Name a thing like {a} and {b}."}]
        answer = f"The {b} and the {a}."
        lines.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer + " Thank you!"}],
                      "rejected": [{"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def run_json(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.parametrize("objective,extra", [("dpo", ["--beta", "0.5"]), ("orpo", ["--orpo-lambda", "0.5"])])
def test_preference_training_prefers_the_marked_answers_on_held_out_pairs(tiny_llama_dir, tmp_path, capsys,
                                                                          objective, extra):
    data = preference_file(tmp_path / "pairs.jsonl")
    lines = run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out",
                              str(tmp_path / "adapter"), "--objective", objective, *extra, "--steps", "24",
                              "--val-split", "0.25", "--eval-every", "12", "--rank", "4", "--alpha", "8",
                              "--seq-len", "96", "--batch-size", "8", "--lr", "5e-3", "--backend", "cpu", "--json"])
    steps = [x for x in lines if x["event"] == "step"]
    evals = [x for x in lines if x["event"] == "eval"]
    assert len(steps) == 24 and [e["step"] for e in evals] == [12, 24]
    assert all("reward_margin" in s and "reward_accuracy" in s for s in steps + evals)
    if objective == "dpo":      # the adapter starts at B = 0: the policy is the reference
        assert steps[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and steps[0]["reward_margin"] == 0.0
    assert evals[-1]["reward_accuracy"] >= 0.9 and evals[-1]["reward_margin"] > 0
    assert np.mean([s["loss"] for s in steps[-4:]]) < steps[0]["loss"]
    assert evals[-1]["perplexity"] is None
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_preference_options_are_refused_clearly(tiny_llama_dir, tmp_path, capsys):
    data = preference_file(tmp_path / "pairs.jsonl", n=4)
    base = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "o"),
            "--backend", "cpu", "--seq-len", "48"]
    assert main(base + ["--objective", "dpo", "--batch-size", "3"]) == 2
    assert "batch-size must be even" in capsys.readouterr().err
    assert main(base + ["--objective", "dpo", "--batch-size", "2", "--packing"]) == 2
    assert "packing" in capsys.readouterr().err
    assert main(base + ["--objective", "dpo", "--label-smoothing", "0.7", "--batch-size", "2"]) == 2
    assert "label_smoothing must be a number in [0, 0.5)" in capsys.readouterr().err
    # LoRA dropout: the policy, reference and gradient passes would see different masks; refused before reading.
    for objective in ("dpo", "orpo"):
        assert main(base + ["--objective", objective, "--batch-size", "2", "--dropout", "0.1"]) == 2
        err = capsys.readouterr().err
        assert f"lora dropout 0.1 with objective {objective}" in err and "set lora dropout to 0" in err
    assert not (tmp_path / "o").exists()


def test_a_dpo_run_resumes_to_the_same_adapter(tiny_llama_dir, tmp_path, capsys):
    from safetensors.numpy import load_file

    data = preference_file(tmp_path / "pairs.jsonl", n=12)
    args = ["--model", str(tiny_llama_dir), "--data", str(data), "--objective", "dpo", "--steps", "4",
            "--save-every", "2", "--keep-checkpoints", "3", "--rank", "4", "--alpha", "8", "--seq-len", "96",
            "--batch-size", "4", "--lr", "5e-3", "--backend", "cpu", "--json"]
    run_json(capsys, ["train", "--out", str(tmp_path / "a"), *args])
    straight = load_file(tmp_path / "a" / "adapter_model.safetensors")
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-00000002"
    lines = run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "a"), "--json",
                              "--backend", "cpu", "--resume", str(checkpoint)])
    steps = [x for x in lines if x["event"] == "step"]
    assert [x["step"] for x in steps] == [3, 4] and all("reward_margin" in x for x in steps)
    resumed = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for key, value in straight.items():
        np.testing.assert_allclose(resumed[key], value, atol=1e-6, rtol=0)


def test_what_is_not_given_is_planned_from_the_pairs(tiny_llama_dir, tmp_path, capsys):
    """Batch size, lr, epochs and warmup left out: the plan reads the file as pairs (an even batch of whole pairs,
    the peers' DPO learning rate), and the log says which reference the run uses."""
    from engine.train.recommend import SMALL_MODEL_PREFERENCE_LR

    data = preference_file(tmp_path / "pairs.jsonl", n=6)
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "a"),
                 "--objective", "dpo", "--steps", "2", "--rank", "4", "--alpha", "8", "--backend", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "plan from the data: 6 preference pairs" in err and f"lr {SMALL_MODEL_PREFERENCE_LR:g}" in err
    assert "DPO reference: the base model (adapter off), a forward pass for every micro-batch" in err
    card = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert "reference: the base model (adapter off), a forward pass every step" in card
