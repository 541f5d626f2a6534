"""`lora-lab export-job`: the run the desktop would make, as a folder that trains elsewhere on PyTorch + Hugging
Face accelerate (one GPU, DDP, FSDP, DeepSpeed ZeRO-2), with transformers' Trainer and PEFT.

Nothing here renders data or decides an order of its own: `prepare_data` (engine.train.runs) reads the corpus
as `lora-lab train` does, and the step plan follows the desktop Trainer's epochs, seeds and accumulation through
the same helpers (`run_steps`, `next_epoch_seed`, engine.corpus.batch_order). The folder:

    job.json              every hyperparameter (the TrainConfig), the base model reference, the data's shapes
    train.py              the training script (a copy of job_files/train.py; it imports nothing of ours)
    data/                 train_input_ids.npy, train_labels.npy [N, T] int32 (padded: pad id, -100);
                          plan.npy [steps, grad_accum, batch] int32 (sequence per row, -1: empty row);
                          plan_epochs.npy [steps]; val_input_ids.npy, val_labels.npy [M, T]
    initial_adapter/      the LoRA tensors the desktop backend would start from, in PEFT's layout
    accelerate/           single_gpu.yaml, multi_gpu.yaml, fsdp.yaml, deepspeed_zero2.yaml (+ ds_zero2.json)
    requirements.txt      pinned versions; README.md; sbatch.slurm
    model/                the base model's files, with copy_model
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Callable

import numpy as np

from engine.backends.base import IGNORE_LABEL
from engine.train.config import TrainConfig
from engine.train.runs import RunInputs, prepare_data
from engine.train.trainer import epoch_seed_generator, next_epoch_seed, run_steps

JOB_FORMAT = 1     # train.py's JOB_FORMAT: the layout of job.json and data/
# The versions the job is tested with (tests/train/test_job.py runs it against them). torch's wheel on PyPI
# is the CUDA build on Linux x86-64. The optional two (bitsandbytes for the 8-bit optimizer, deepspeed for ZeRO)
# are their releases current when this was written, not run by our tests: neither installs on the CI machine.
REQUIREMENTS = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "accelerate": "1.16.0",
                "safetensors": "0.8.0", "numpy": "2.4.6"}
OPTIONAL_REQUIREMENTS = {"deepspeed": "0.19.8", "bitsandbytes": "0.50.2"}
ACCELERATE_CONFIGS = ("single_gpu.yaml", "multi_gpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "ds_zero2.json")


@dataclass(frozen=True)
class JobSummary:
    folder: Path
    base_model: str          # what the job names as its base (hub id or path)
    model_copied: bool
    steps: int               # optimizer steps with one process
    train_sequences: int
    val_sequences: int

    def lines(self) -> list[str]:
        return [f"job written to {self.folder}",
                f"  base model: {self.base_model}" + (" (copied into model/)" if self.model_copied else ""),
                f"  {self.train_sequences} training and {self.val_sequences} validation sequences, "
                f"{self.steps} optimizer steps with one process",
                f"  run it: cd {self.folder} && accelerate launch --config_file accelerate/single_gpu.yaml train.py",
                "  (README.md has the multi-GPU, multi-node and SLURM lines)"]


def step_plan(n_sequences: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(plan [steps, grad_accum, batch_size] int32, epoch of each step [steps] int32): the sequence index in
    each row of each micro-batch the desktop Trainer feeds its backend at each step; -1 marks an empty row
    (the last batch of an epoch is filled up with them) and a step at an epoch's end may hold fewer micro-
    batches (the rest are all -1). Mirrors Trainer._loop: a step never spans two epochs."""
    from engine.corpus import batch_count, batch_order

    B, G = config.batch_size, config.grad_accum
    per_epoch = batch_count(n_sequences, B)
    steps = run_steps(config, per_epoch)
    plan = np.full((steps, G, B), -1, np.int32)
    epochs = np.zeros(steps, np.int32)
    rng = epoch_seed_generator(config.seed)
    epoch, batch = 0, 0
    order = batch_order(n_sequences, config.shuffle, next_epoch_seed(rng), epoch)
    for step in range(steps):
        epochs[step] = epoch
        for micro in range(G):
            if batch >= per_epoch:
                break
            rows = order[batch * B:(batch + 1) * B]
            plan[step, micro, :len(rows)] = rows
            batch += 1
        if batch >= per_epoch:
            epoch, batch = epoch + 1, 0
            order = batch_order(n_sequences, config.shuffle, next_epoch_seed(rng), epoch)
    return plan, epochs


def padded(sequences, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, seq_len] int32 input ids (right-padded with pad_id) and labels (padded with -100), as batches() pads."""
    ids = np.full((len(sequences), seq_len), pad_id, np.int32)
    labels = np.full((len(sequences), seq_len), IGNORE_LABEL, np.int32)
    for row, s in enumerate(sequences):
        ids[row, :len(s)], labels[row, :len(s)] = s.input_ids, s.labels
    return ids, labels


def export_job(config: TrainConfig, inputs: RunInputs, out_dir: str | Path, copy_model: bool = False,
               overwrite: bool = False, log: Callable[[str], None] = lambda _m: None,
               corpus_progress: Callable[[int, int], None] | None = None,
               corpus_cancel: Callable[[], bool] | None = None) -> JobSummary:
    """Write the job folder for `config` on `inputs` (inputs.backend is not used: the job runs on PyTorch)."""
    from engine.lora.config import init_lora_state
    from engine.lora.peft_write import export_adapter
    from engine.model.references import resolve_for_adapter
    from engine.model.spec import load_model_spec

    if config.objective != "sft":   # the job's script is a supervised (cross-entropy) training loop
        raise ValueError(f"export-job writes supervised runs only; objective {config.objective} is trained by "
                         "`lora-lab train --objective ...` here")
    if config.adaptive_rank is not None:    # the job's script trains plain PEFT LoRA
        raise ValueError("export-job writes plain LoRA runs only; adaptive rank (AdaLoRA) is trained by "
                         "`lora-lab train --adaptive-rank` here")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; choose a new folder for the job (or overwrite it)")
    model_dir, base_model = resolve_for_adapter(inputs.model, log=log)
    spec = load_model_spec(model_dir)
    data = prepare_data(config, inputs, model_dir, spec, base_model, log=log, corpus_progress=corpus_progress,
                        corpus_cancel=corpus_cancel)
    config, corpus = data.config, data.corpus
    if config.lora.dropout > 0:
        log("note: LoRA dropout draws its own masks on PyTorch, so the job's losses are not the desktop's step "
            "for step (the expected values are the same)")
    if config.optim.name == "adamw8bit":
        log("note: the job uses bitsandbytes' AdamW8bit, close to but not the same as LoRA-Lab's 8-bit AdamW")
    plan, epochs = step_plan(len(corpus.train), config)
    pad = corpus.tokenizer.pad_id

    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    train_ids, train_labels = padded(corpus.train, config.seq_len, pad)
    val_ids, val_labels = padded(corpus.val, config.seq_len, pad)
    for name, array in (("train_input_ids", train_ids), ("train_labels", train_labels), ("plan", plan),
                        ("plan_epochs", epochs), ("val_input_ids", val_ids), ("val_labels", val_labels)):
        np.save(out / "data" / f"{name}.npy", array)
    state = data.init_state if data.init_state is not None else init_lora_state(spec, config.lora, config.seed)
    export_adapter(out / "initial_adapter", state, config.lora, base_model,
                   {"note": "the initial LoRA tensors of a job written by lora-lab export-job"})

    hub_id = str(inputs.model).strip() == base_model and not Path(base_model).expanduser().exists()
    if copy_model:
        shutil.copytree(model_dir, out / "model", dirs_exist_ok=overwrite)
        model_ref = "model"
    else:
        model_ref = base_model if hub_id else str(Path(model_dir).resolve())
    job = {"format": JOB_FORMAT, "created_by": "lora-lab export-job", "base_model": base_model, "model": model_ref,
           "config": config.to_dict(), "pad_id": int(pad), "steps": int(plan.shape[0]),
           "data": {"train_sequences": len(corpus.train), "val_sequences": len(corpus.val),
                    "trained_tokens": int(sum(s.trainable_tokens for s in corpus.train)),
                    "fingerprint": data.train.fingerprint},
           "inputs": inputs.to_dict()}
    (out / "job.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    _write_files(out, config, job, hub_id, copy_model)
    summary = JobSummary(out, base_model, copy_model, int(plan.shape[0]), len(corpus.train), len(corpus.val))
    for line in summary.lines():
        log(line)
    return summary


def requirements_text(config: TrainConfig) -> str:
    lines = ["# Versions `lora-lab export-job` was tested with; install with: pip install -r requirements.txt"]
    lines += [f"{name}=={version}" for name, version in REQUIREMENTS.items()]
    bnb = f"bitsandbytes=={OPTIONAL_REQUIREMENTS['bitsandbytes']}"
    lines.append(bnb if config.optim.name == "adamw8bit" else f"# {bnb}    (only for the adamw8bit optimizer)")
    lines.append(f"# deepspeed=={OPTIONAL_REQUIREMENTS['deepspeed']}    (only for accelerate/deepspeed_zero2.yaml)")
    return "\n".join(lines) + "\n"


def _write_files(out: Path, config: TrainConfig, job: dict, hub_id: bool, copied: bool) -> None:
    files = resources.files("engine.train") / "job_files"
    shutil.copyfile(files / "train.py", out / "train.py")
    (out / "accelerate").mkdir(exist_ok=True)
    for name in ACCELERATE_CONFIGS:
        shutil.copyfile(files / "accelerate" / name, out / "accelerate" / name)
    (out / "requirements.txt").write_text(requirements_text(config), encoding="utf-8")
    c = config
    if copied:
        model_note = "The base model's files are in `model/`: the folder is all the cluster needs."
    elif hub_id:
        model_note = (f"The base model is the hub id `{job['base_model']}`: each machine downloads it (set `HF_HOME`"
                      " to a shared disk, and `HF_TOKEN` for a gated model).")
    else:
        model_note = (f"The base model is the local folder `{job['model']}`. Copy it to the cluster and pass "
                      "`--model /path/to/it` to train.py (or export again with `--copy-model`).")
    values = dict(base_model=job["base_model"], model_note=model_note, steps=job["steps"],
                  sequences=job["data"]["train_sequences"], val_sequences=job["data"]["val_sequences"],
                  rank=c.lora.rank, alpha=f"{c.lora.alpha:g}", dropout=f"{c.lora.dropout:g}",
                  targets=", ".join(c.lora.targets), rslora="yes" if c.lora.use_rslora else "no",
                  optimizer=c.optim.name, weight_decay=f"{c.optim.weight_decay:g}", lr=f"{c.lr:g}",
                  schedule=c.schedule, warmup=c.warmup_steps, clip=f"{c.max_grad_norm:g}" if c.max_grad_norm else "off",
                  batch=c.batch_size, accum=c.grad_accum, seq_len=c.seq_len, seed=c.seed)
    for name, target in (("README.md.in", "README.md"), ("sbatch.slurm.in", "sbatch.slurm")):
        text = Template((files / name).read_text(encoding="utf-8")).substitute(values)
        (out / target).write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class RunLog:
    """A run's losses read back from JSON lines (a job's output/log.jsonl, or `lora-lab train --json`)."""
    steps: tuple[int, ...]
    losses: tuple[float, ...]          # training loss per step (skipped, non-finite steps left out)
    eval_steps: tuple[int, ...]
    eval_losses: tuple[float, ...]
    backend: str | None                # the summary's backend, when the run finished


def read_run_log(path: str | Path) -> RunLog:
    """The step and eval events of a JSON-lines log; ValueError naming the line that is not one."""
    steps, losses, eval_steps, eval_losses, backend = [], [], [], [], None
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            kind = event["event"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} line {number}: expected a JSON object with an \"event\" (a run log from "
                             "`lora-lab train --json` or an exported job's output/log.jsonl)") from None
        if kind == "step" and event.get("loss") is not None and not event.get("skipped"):
            steps.append(int(event["step"]))
            losses.append(float(event["loss"]))
        elif kind == "eval" and event.get("loss") is not None:
            eval_steps.append(int(event["step"]))
            eval_losses.append(float(event["loss"]))
        elif kind == "summary":
            backend = event.get("backend")
    if not steps and not eval_steps:
        raise ValueError(f"{path} holds no step or eval events: it is not a training log")
    return RunLog(tuple(steps), tuple(losses), tuple(eval_steps), tuple(eval_losses), backend)
