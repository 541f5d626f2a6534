"""`lora-lab export-job`: the job's data is the desktop run's, and the job, run on PyTorch + accelerate from a copy
of its folder that cannot import LoRA-Lab, follows the desktop CPU backend's losses and writes an adapter that
lora-lab opens."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.backends.base import PendingStep, StepResult, TrainingBackend, counted_tokens
from engine.cli import main
from engine.corpus import Segment, Sequence
from engine.lora.config import LoraConfig
from engine.train.config import TrainConfig
from engine.train.data import CorpusBatches
from engine.train.job import padded, step_plan
from engine.train.trainer import Trainer
from tests.train_helpers import Recorder

TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is "
        "Paris.\nLoRA adapters add a low rank update to the frozen weights of a language model.\n")
# 23 training sequences in batches of 3: 8 batches an epoch, accumulation 2 -> 4 steps an epoch; 6 steps cross
# into the second epoch. Warmup, cosine, weight decay, rsLoRA and clipping all act in the first steps.
RUN = ["--rank", "4", "--alpha", "8", "--rslora", "--seq-len", "32", "--batch-size", "3", "--grad-accum", "2",
       "--lr", "5e-3", "--steps", "6", "--warmup", "2", "--weight-decay", "0.01", "--max-grad-norm", "1.5",
       "--seed", "3", "--val-split", "0.2", "--eval-every", "3"]
# A child process that cannot import our packages: the job folder must be all it needs.
NO_LORA_LAB = "import sys\nfor name in ('engine', 'app', 'bench', 'tests'):\n    sys.modules[name] = None\n"


class RecordingBackend(TrainingBackend):
    """Keeps the micro-batches the trainer hands it; does no arithmetic."""
    name = "recording"

    def __init__(self):
        self.steps = []

    def train_step(self, micro_batches, lr, max_grad_norm):
        self.steps.append([(ids.copy(), labels.copy()) for ids, labels in micro_batches])
        tokens = sum(counted_tokens(labels) for _, labels in micro_batches)
        return PendingStep.done(StepResult(len(self.steps), 1.0, tokens, 1.0, False))

    def eval_loss(self, input_ids, labels):
        return 0.0, 0

    def logits(self, input_ids):
        raise NotImplementedError

    def lora_state(self):
        return {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((1, 1), np.float32)}

    def lora_state_before_update(self):
        return self.lora_state()

    def load_lora_state(self, state):
        pass

    def optimizer_state(self):
        return {"step": np.array(len(self.steps), np.int64)}

    def load_optimizer_state(self, state):
        pass

    def memory_bytes(self):
        return 0

    def close(self):
        pass


@pytest.mark.parametrize("n_sequences,batch,accum,epochs,max_steps", [(23, 3, 2, 3, 0), (10, 4, 3, 2, 0),
                                                                        (7, 2, 1, 1, 9)])
def test_step_plan_is_what_the_desktop_trainer_feeds_its_backend(tmp_path, n_sequences, batch, accum, epochs,
                                                                 max_steps):
    rng = np.random.default_rng(1)
    sequences = []
    for _ in range(n_sequences):
        n = int(rng.integers(2, 13))
        ids = rng.integers(0, 50, n).astype(np.int32)
        labels = np.where(rng.random(n) < 0.3, -100, ids).astype(np.int32)
        sequences.append(Sequence(ids, labels, (Segment(0, 0, 0),)))
    config = TrainConfig(lora=LoraConfig(rank=1, alpha=1, targets=("q_proj",)), batch_size=batch, grad_accum=accum,
                         seq_len=13, epochs=epochs, max_steps=max_steps, seed=5)
    backend = RecordingBackend()
    source = CorpusBatches(sequences, batch, 13, pad_id=99, shuffle=True)
    recorder = Recorder()
    Trainer(config, lambda *a, **k: backend, source, tmp_path, base_model="m", callback=recorder).run()

    plan, epochs_of = step_plan(n_sequences, config)
    ids, labels = padded(sequences, 13, pad_id=99)
    assert plan.shape[0] == len(backend.steps)
    assert list(epochs_of) == [e.epoch for e in recorder.steps]
    for step, micro_batches in enumerate(backend.steps):
        for micro in range(accum):
            rows = plan[step, micro]
            if micro >= len(micro_batches):
                assert (rows == -1).all()       # the end of an epoch: fewer micro-batches in this step
                continue
            want_ids = np.where(rows[:, None] >= 0, ids[rows], 99)
            want_labels = np.where(rows[:, None] >= 0, labels[rows], -100)
            assert np.array_equal(micro_batches[micro][0], want_ids)
            assert np.array_equal(micro_batches[micro][1], want_labels)


def run_json(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def desktop_and_job(tiny_llama_dir, tmp_path_factory):
    """The desktop CPU run, and its job exported with --copy-model and then moved to another folder."""
    root = tmp_path_factory.mktemp("job")
    corpus = root / "train.txt"
    corpus.write_text(TEXT * 12, encoding="utf-8")
    args = ["--model", str(tiny_llama_dir), "--data", str(corpus), *RUN]
    from io import StringIO
    from contextlib import redirect_stdout
    out = StringIO()
    with redirect_stdout(out):
        assert main(["train", *args, "--out", str(root / "desktop"), "--backend", "cpu", "--json"]) == 0
        assert main(["export-job", *args, "--out", str(root / "exported"), "--copy-model"]) == 0
    desktop = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    job = root / "elsewhere" / "job"
    shutil.copytree(root / "exported", job)
    shutil.rmtree(root / "exported")
    blocker = root / "no-lora-lab"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_LORA_LAB, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    return {"root": root, "corpus": corpus, "desktop": desktop, "job": job, "env": env}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_job_with_one_process_follows_the_desktop_cpu_losses(desktop_and_job, tiny_llama_dir, capsys):
    d = desktop_and_job
    result = subprocess.run([sys.executable, str(d["job"] / "train.py"), "--cpu", "--output", str(d["root"] / "one")],
                            cwd=d["root"], env=d["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    job = read_log(d["root"] / "one" / "log.jsonl")
    for kind in ("step", "eval"):
        ours = [e for e in d["desktop"] if e["event"] == kind]
        theirs = [e for e in job if e["event"] == kind]
        assert [e["step"] for e in theirs] == [e["step"] for e in ours]
        for a, b in zip(ours, theirs):
            assert abs(a["loss"] - b["loss"]) < 1e-3, (kind, a, b)
            assert a["tokens"] == b["tokens"]
            if kind == "step":
                assert b["lr"] == pytest.approx(a["lr"], rel=1e-9, abs=1e-12)
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
                assert b["epoch"] == a["epoch"]
    assert job[-1]["event"] == "summary" and job[-1]["steps"] == 6 and not job[-1]["stopped"]

    # The adapter comes back as PEFT wrote it, and lora-lab evaluates it and continues training from it.
    adapter = d["root"] / "one"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_llama_dir).resolve())
    evaluate = ["eval", "--model", str(tiny_llama_dir), "--data", str(d["corpus"]), "--seq-len", "32",
                "--backend", "cpu", "--json"]
    (base,) = run_json(capsys, evaluate)
    (tuned,) = run_json(capsys, evaluate + ["--adapter", str(adapter)])
    (desktop_tuned,) = run_json(capsys, evaluate + ["--adapter", str(d["root"] / "desktop")])
    assert tuned["loss"] < base["loss"] and tuned["loss"] == pytest.approx(desktop_tuned["loss"], abs=1e-3)
    lines = run_json(capsys, ["train", "--model", str(tiny_llama_dir), "--data", str(d["corpus"]), "--steps", "1",
                              "--seq-len", "32", "--batch-size", "3", "--init-adapter", str(adapter),
                              "--out", str(d["root"] / "continued"), "--backend", "cpu", "--json"])
    assert lines[-1]["event"] == "summary" and lines[-1]["steps"] == 1


@pytest.mark.slow
def test_job_on_two_processes_with_accelerate_launch(desktop_and_job, tiny_llama_dir, capsys):
    d = desktop_and_job
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate is not installed (pip install lora-lab[job])")
    out = d["root"] / "two"
    # `accelerate launch --cpu` starts one process (several need mpirun); --multi_gpu starts them with torchrun,
    # and train.py --cpu then joins them over gloo: a real data-parallel run without a GPU.
    result = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                             str(d["job"] / "train.py"), "--cpu", "--output", str(out)],
                            cwd=d["root"], env=d["env"], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    job = read_log(out / "log.jsonl")
    steps = [e for e in job if e["event"] == "step"]
    desktop = [e for e in d["desktop"] if e["event"] == "step"]
    # Each step of 2 processes takes the data of 2 desktop steps: their tokens, in one update.
    assert [e["tokens"] for e in steps] == [a["tokens"] + b["tokens"] for a, b in zip(desktop[::2], desktop[1::2])]
    assert "2 process" in job[-1]["backend"] and job[-1]["steps"] == 3
    # The first step's learning rate is 0 (warmup), so both desktop steps 1 and 2 saw the initial adapter: the
    # 2-process loss is their token-weighted mean, which checks the loss normalisation across processes.
    a, b = desktop[0], desktop[1]
    assert steps[0]["loss"] == pytest.approx((a["loss"] * a["tokens"] + b["loss"] * b["tokens"]) /
                                             (a["tokens"] + b["tokens"]), abs=1e-4)
    evaluate = ["eval", "--model", str(tiny_llama_dir), "--data", str(d["corpus"]), "--seq-len", "32",
                "--backend", "cpu", "--json"]
    (base,) = run_json(capsys, evaluate)
    (tuned,) = run_json(capsys, evaluate + ["--adapter", str(out)])
    assert tuned["loss"] < base["loss"]
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_an_adaptive_rank_run_is_refused_not_written_as_plain_lora(tmp_path):
    from engine.lora.adalora import AdaLoraSettings
    from engine.lora.config import LoraConfig
    from engine.train.job import export_job
    from engine.train.runs import RunInputs

    with pytest.raises(ValueError, match="plain LoRA runs only; adaptive rank"):
        export_job(TrainConfig(lora=LoraConfig(rank=12), adaptive_rank=AdaLoraSettings()), RunInputs(model="m", data=("a.jsonl",)),
                   tmp_path / "job")
    assert not (tmp_path / "job").exists()
