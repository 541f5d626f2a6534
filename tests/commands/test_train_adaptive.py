"""`lora-lab train --adaptive-rank`: AdaLoRA from the command line on the CPU backend, and its refusals."""
import json

import pytest

from engine.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is "
        "Paris.\nLoRA adapters add a low rank update to the frozen weights of a language model.\n")
ADAPTIVE = ["--adaptive-rank", "--init-rank", "4", "--target-rank", "2", "--tinit", "2", "--tfinal", "2",
            "--delta-t", "1", "--orth-reg-weight", "0.3", "--ipt-beta1", "0.8", "--ipt-beta2", "0.9"]
TRAIN = ["--alpha", "8", "--targets", "q_proj,v_proj", "--seq-len", "17", "--batch-size", "2", "--lr", "1e-2",
         "--backend", "cpu", "--steps", "8", "--val-split", "0.2"]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT * 6, encoding="utf-8")
    return path


def test_adaptive_rank_run_reports_rank_maps_and_writes_both_adapters(tiny_llama_dir, corpus_file, tmp_path,
                                                                      capsys):
    out = tmp_path / "ada"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out),
                 *TRAIN, *ADAPTIVE, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    steps = [x for x in lines if x["event"] == "step"]
    assert len(steps) == 8 and all(len(s["rank_map"]) == 2 and len(s["rank_map"][0]) == 2 for s in steps)
    assert [sum(map(sum, s["rank_map"])) for s in steps[:2]] == [16, 16]      # tinit: the full budget
    assert [sum(map(sum, s["rank_map"])) for s in steps[-3:]] == [8, 8, 8]    # from total_step - tfinal: target
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["target_r"] == 2
    assert config["total_step"] == 8 and config["orth_reg_weight"] == 0.3 and config["beta2"] == 0.9
    assert sum(map(sum, config["rank_pattern"].values())) == 8
    folded = json.loads((out / "lora-rank-pattern" / "adapter_config.json").read_text())
    assert folded["peft_type"] == "LORA" and sum(folded["rank_pattern"].values()) == 8
    # Exports and evaluation of the run folder read the folded LoRA (GGUF and merged take per-module ranks).
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(out), "--to", "gguf",
                 "--out", str(tmp_path / "gguf")]) == 0
    assert list((tmp_path / "gguf").glob("*.gguf"))


@pytest.mark.parametrize("extra, message", [
    (["--tinit", "3", "--delta-t", "2"], "--tinit, --delta-t: these settings are AdaLoRA's; add --adaptive-rank"),
    (ADAPTIVE + ["--dropout", "0.1"], "adaptive rank (AdaLoRA) with lora dropout 0.1"),
    (ADAPTIVE + ["--rank", "6"], "LoRA rank 6 differs from init_r 4"),
    (ADAPTIVE + ["--objective", "orpo"], "adaptive rank (AdaLoRA) with objective orpo"),
    (["--adaptive-rank", "--init-rank", "4", "--target-rank", "6"], "cannot exceed the initial rank"),
])
def test_adaptive_rank_refusals_end_with_one_line(tiny_llama_dir, corpus_file, tmp_path, capsys, extra, message):
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(tmp_path / "o"),
                 "--backend", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("lora-lab train: error:")


def test_export_job_refuses_adaptive_rank(tiny_llama_dir, corpus_file, tmp_path, capsys):
    """The job's script trains plain PEFT LoRA: an AdaLoRA run is refused by name, not exported as LoRA."""
    assert main(["export-job", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--seq-len", "24",
                 "--out", str(tmp_path / "job"), *ADAPTIVE]) == 2
    assert "export-job writes plain LoRA runs only; adaptive rank (AdaLoRA)" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()
