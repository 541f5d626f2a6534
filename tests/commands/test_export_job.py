"""`lora-lab export-job`: what the folder holds, and what the command refuses (the job's runs: tests/train/test_job.py)."""
import json
import subprocess
from importlib import metadata

import numpy as np
import pytest
import yaml

from engine.cli import main
from engine.train.job import REQUIREMENTS

TEXT = "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.\n" * 20


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_export_job_writes_a_complete_folder(tiny_llama_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["export-job", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--out", str(out),
                 "--rank", "6", "--alpha", "12", "--targets", "q_proj,v_proj", "--seq-len", "24", "--batch-size", "2",
                 "--grad-accum", "3", "--epochs", "2", "--schedule", "linear", "--optimizer", "sgd",
                 "--val-split", "0.25", "--seed", "7"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    job = json.loads((out / "job.json").read_text())
    c = job["config"]
    assert (c["lora"]["rank"], c["lora"]["alpha"], c["lora"]["targets"]) == (6, 12.0, ["q_proj", "v_proj"])
    assert (c["batch_size"], c["grad_accum"], c["epochs"], c["schedule"], c["optim"]["name"], c["seed"]) == \
        (2, 3, 2, "linear", "sgd", 7)
    assert job["model"] == str(tiny_llama_dir.resolve())       # a local model is referenced, not copied
    plan = np.load(out / "data" / "plan.npy")
    ids = np.load(out / "data" / "train_input_ids.npy")
    val = np.load(out / "data" / "val_input_ids.npy")
    assert plan.shape[1:] == (3, 2) and plan.shape[0] == job["steps"] and ids.shape == (job["data"]["train_sequences"], 24)
    assert len(val) == job["data"]["val_sequences"] > 0
    used = plan[plan >= 0]                                       # every sequence once per epoch, two epochs
    assert np.array_equal(np.bincount(used, minlength=len(ids)), np.full(len(ids), 2))
    adapter = json.loads((out / "initial_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 6 and adapter["target_modules"] == ["q_proj", "v_proj"]

    for name in ("single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2"):
        config = yaml.safe_load((out / "accelerate" / f"{name}.yaml").read_text())
        assert config["num_processes"] >= 1 and config["compute_environment"] == "LOCAL_MACHINE"
    assert json.loads((out / "accelerate" / "ds_zero2.json").read_text())["zero_optimization"]["stage"] == 2
    requirements = (out / "requirements.txt").read_text().splitlines()
    for name, version in REQUIREMENTS.items():
        assert f"{name}=={version}" in requirements
        assert metadata.version(name).split("+")[0] == version, f"{name}: the pin is not what the tests run"
    readme = (out / "README.md").read_text()
    assert "accelerate launch --config_file accelerate/multi_gpu.yaml --num_machines 2" in readme
    assert "$" not in readme.replace("$ ", "") and "--adapter output" in readme
    subprocess.run(["bash", "-n", str(out / "sbatch.slurm")], check=True)
    assert "srun" in (out / "sbatch.slurm").read_text()


def test_export_job_refuses(tiny_llama_dir, corpus_file, tmp_path, capsys):
    base = ["export-job", "--model", str(tiny_llama_dir), "--data", str(corpus_file), "--seq-len", "24"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert main([*base, "--out", str(taken)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a"), "--init-adapter", str(tmp_path), "--rank", "4"]) == 2
    assert "--init-adapter brings its own rank" in capsys.readouterr().err
    assert main(["export-job", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "b")]) == 2
    assert "no training data" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--objective", "dpo", "--batch-size", "2"]) == 2
    assert "export-job writes supervised runs only" in capsys.readouterr().err
