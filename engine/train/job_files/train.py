#!/usr/bin/env python
"""Train the LoRA adapter this folder describes, with transformers' Trainer and PEFT, on PyTorch + accelerate.

Written by `lora-lab export-job`. It imports nothing of LoRA-Lab's, and follows the desktop run step for step:
- data: data/*.npy hold the desktop's sequences (same rendering, prompt masking, packing and validation split);
  data/plan.npy [steps, grad_accum, batch_size] names the sequence in each row of each micro-batch of each
  optimizer step (-1: an empty row), so order, shuffling and epochs are LoRA-Lab's, not a sampler's;
- loss: the sum of token cross-entropies over all micro-batches of a step, on every process, divided by the
  number of counted tokens (labels[:, 1:] != -100) over all of them: gradient accumulation and data parallelism
  then equal one big batch, as on the desktop (transformers' default mean per micro-batch does not);
- init: the LoRA tensors start from initial_adapter/ (LoRA-Lab's initialisation, or the adapter being continued);
- optimizer: AdamW (torch.optim.AdamW, decay on every LoRA tensor), SGD with decay decoupled like AdamW's, or
  bitsandbytes' AdamW8bit (close to, not the same as, LoRA-Lab's 8-bit AdamW); gradients clipped to a global
  norm as torch's clip_grad_norm_; a step whose gradients are not finite changes nothing (weights, moments and
  step count) and the run stops after `max_nonfinite_in_a_row` such steps;
- schedule: transformers' constant/linear/cosine with linear warmup, over the run's optimizer steps.
With N processes each optimizer step takes the data of N desktop steps: N times the batch, 1/N of the steps.

Writes to --output (default output/): the PEFT adapter, log.jsonl (one JSON object per step and evaluation,
then a summary: the events of `lora-lab train --json`) and, with save_every, Trainer checkpoints in checkpoints/.

    accelerate launch --config_file accelerate/single_gpu.yaml train.py
    python train.py --cpu --max-steps 3          # a smoke test without accelerate
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
JOB_FORMAT = 1


def parse_args(argv=None):
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description="Train this folder's LoRA job (see README.md).")
    p.add_argument("--job", type=Path, default=here, help="the job folder (default: this script's)")
    p.add_argument("--model", help="base model folder or hub id (default: job.json's model)")
    p.add_argument("--output", type=Path, help="where the adapter and log.jsonl go (default: <job>/output)")
    p.add_argument("--bf16", action="store_true", help="frozen weights and activations in bfloat16 (LoRA in fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps, the schedule unchanged (a smoke test); 0: all")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU exists")
    return p.parse_args(argv)


# -- the data: the desktop's micro-batches, dealt to processes -----------------------------------------------
class PlanDataset(torch.utils.data.Dataset):
    """Item i is one micro-batch {"input_ids", "labels"} [B, T] int64.

    accelerate gives item i to process i % P (batch size 1 per process, sequential sampler), so item
    (s*G + j)*P + k is micro-batch j of desktop step s*P + k: global step s takes desktop steps s*P .. s*P+P-1.
    Steps past the end of the plan (when P does not divide it) are empty: they count no token."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, plan: np.ndarray, processes: int, pad_id: int):
        self.ids, self.labels, self.plan, self.P, self.pad_id = ids, labels, plan, processes, pad_id
        self.desktop_steps, self.G, self.B = plan.shape
        self.steps = -(-self.desktop_steps // processes)

    def __len__(self):
        return self.steps * self.G * self.P

    def rows(self, i: int) -> np.ndarray:
        k, t = i % self.P, i // self.P
        s, j = divmod(t, self.G)
        step = s * self.P + k
        return self.plan[step, j] if step < self.desktop_steps else np.full(self.B, -1, np.int32)

    def __getitem__(self, i):
        return micro_batch(self.ids, self.labels, self.rows(i), self.pad_id)


def micro_batch(ids: np.ndarray, labels: np.ndarray, rows: np.ndarray, pad_id: int) -> dict:
    T = ids.shape[1]
    out_ids = np.full((len(rows), T), pad_id, np.int64)
    out_labels = np.full((len(rows), T), IGNORE, np.int64)
    for r, seq in enumerate(rows):
        if seq >= 0:
            out_ids[r], out_labels[r] = ids[seq], labels[seq]
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_labels)}


def first_item(items):
    (item,) = items
    return item


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in float32, counted tokens): position t predicts labels[t + 1]."""
    targets = labels[:, 1:].reshape(-1)
    scores = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(scores, targets, ignore_index=IGNORE, reduction="sum"), (targets != IGNORE).sum()


# -- the optimizer: the desktop's update rules, guarded against non-finite gradients -------------------------
def _any_nonfinite(optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any().to(torch.int32) if grads else \
        torch.zeros((), dtype=torch.int32, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)   # sharded (FSDP/ZeRO) grads
    return bool(bad.item())


def guarded(cls):
    """`cls` whose step() does nothing when any gradient is NaN/inf, as the desktop backends skip such a step."""

    class Guarded(cls):
        skipped_last, skipped_in_a_row = False, 0

        def step(self, closure=None):
            self.skipped_last = _any_nonfinite(self)
            if self.skipped_last:
                self.skipped_in_a_row += 1
                return None
            self.skipped_in_a_row = 0
            return super().step(closure)

    Guarded.__name__ = f"Guarded{cls.__name__}"
    return Guarded


class DecoupledSGD(torch.optim.Optimizer):
    """p *= 1 - lr*wd; p -= lr*g: LoRA-Lab's SGD (torch.optim.SGD would add wd*p to the gradient instead)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(p.grad, alpha=-group["lr"])
        return None


def make_optimizer(params, job: dict):
    o, lr = job["config"]["optim"], job["config"]["lr"]
    if o["name"] == "adamw":
        # foreach=False: torch's single-tensor path, the one LoRA-Lab's optimizers follow operation by operation.
        return guarded(torch.optim.AdamW)(params, lr=lr, betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                          weight_decay=o["weight_decay"], foreach=False)
    if o["name"] == "sgd":
        return guarded(DecoupledSGD)(params, lr=lr, weight_decay=o["weight_decay"])
    if o["name"] == "adamw8bit":
        import bitsandbytes as bnb   # requirements.txt names it for this optimizer

        return guarded(bnb.optim.AdamW8bit)(params, lr=lr, betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                                            weight_decay=o["weight_decay"], min_8bit_size=o["block_size"])
    raise SystemExit(f"job.json: optimizer {o['name']!r} is unknown to this script")


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


# -- the trainer ------------------------------------------------------------------------------------------
def build_trainer_class():
    from transformers import Trainer, get_scheduler

    class DesktopTrainer(Trainer):
        """transformers' Trainer with LoRA-Lab's loss normalisation, optimizer, schedule and evaluation."""

        loss_is_scaled_for_ga = True      # compute_loss already divides by the step's counted tokens

        def setup(self, job: dict, val, log):
            self.job, self.val, self.jsonl = job, val, log
            self.step_tokens, self.raw_optimizer = 0, None

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches = []
            for _ in range(num_batches):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
            local = sum(((b["labels"][:, 1:] != IGNORE).sum() for b in batches), torch.zeros((), dtype=torch.long))
            total = self.accelerator.reduce(local.to(device), reduction="sum")
            self.step_tokens = int(total)
            return batches, total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(input_ids=inputs["input_ids"], use_cache=False)
            loss_sum, count = token_loss_sum(outputs.logits, inputs["labels"])
            total = num_items_in_batch if num_items_in_batch is not None else count
            # Data-parallel wrappers average gradients over processes; × P undoes that, so the gradient is that
            # of (sum over every process's tokens) / (their count).
            loss = loss_sum / total.clamp(min=1) * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = self.raw_optimizer = make_optimizer(params, self.job)
            return self.optimizer

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                c = self.job["config"]
                self.lr_scheduler = get_scheduler(SCHEDULERS[c["schedule"]], optimizer or self.optimizer,
                                                  num_warmup_steps=min(c["warmup_steps"], num_training_steps),
                                                  num_training_steps=num_training_steps)
            return self.lr_scheduler

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """Mean token cross-entropy over the validation batches (each process takes every P-th)."""
            model = self.model_wrapped
            was_training = model.training
            model.eval()
            P, k = self.accelerator.num_processes, self.accelerator.process_index
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            with torch.no_grad():
                for i in range(k, len(self.val), P):
                    batch = {n: t.to(self.args.device) for n, t in self.val[i].items()}
                    loss_sum, count = token_loss_sum(model(input_ids=batch["input_ids"], use_cache=False).logits,
                                                     batch["labels"])
                    total += torch.stack([loss_sum.double(), count.double()])
            total = self.accelerator.reduce(total, reduction="sum")
            model.train(was_training)
            loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": int(total[1])}
            self.jsonl.eval(self.state.global_step, loss, int(total[1]))
            self.log(metrics)
            return metrics

    return DesktopTrainer


class JsonLog:
    """log.jsonl in the events of `lora-lab train --json`; written by the main process only."""

    def __init__(self, path: Path, main: bool, total: int):
        self.path, self.main, self.total, self.start = path, main, total, time.perf_counter()
        self.losses, self.tokens, self.skipped, self.last_eval, self.steps = [], 0, [], None, 0
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")

    def _emit(self, obj: dict):
        if self.main:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(obj, allow_nan=False) + "\n")

    @staticmethod
    def _finite(x):
        return x if x is not None and math.isfinite(x) else None

    def step(self, step, epoch, loss, lr, grad_norm, tokens, skipped, memory_bytes):
        self.steps = step
        elapsed = time.perf_counter() - self.start
        if skipped:
            self.skipped.append(step)
        else:
            self.losses.append(loss)
            self.tokens += tokens
        self._emit({"event": "step", "step": step, "total": self.total, "epoch": epoch, "loss": self._finite(loss),
                    "lr": lr, "grad_norm": self._finite(grad_norm), "tokens": tokens,
                    "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed,
                    "eta_s": elapsed / step * (self.total - step), "memory_bytes": memory_bytes, "skipped": skipped})

    def eval(self, step, loss, tokens):
        self.last_eval = (step, loss)
        perplexity = math.exp(loss) if loss < 700 else None
        self._emit({"event": "eval", "step": step, "loss": self._finite(loss), "perplexity": perplexity,
                    "tokens": tokens})

    def summary(self, adapter_dir: Path, stopped: bool, backend: str, failure: str | None):
        last = self.losses[-10:]
        eval_loss = self.last_eval[1] if self.last_eval else None
        self._emit({"event": "summary", "steps": self.steps, "total_steps": self.total,
                    "applied_steps": self.steps - len(self.skipped), "skipped_steps": self.skipped,
                    "first_loss": self.losses[0] if self.losses else None,
                    "final_loss": float(np.mean(last)) if last else None, "eval_loss": self._finite(eval_loss),
                    "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 700 else None,
                    "tokens": self.tokens, "elapsed_s": time.perf_counter() - self.start,
                    "adapter_dir": str(adapter_dir), "checkpoint": None, "stopped": stopped, "backend": backend,
                    **({"failure": failure} if failure else {})})


def build_callback(trainer, log: JsonLog, job: dict, epoch_of_step: np.ndarray, max_steps: int):
    from transformers import TrainerCallback

    c = job["config"]

    class Desktop(TrainerCallback):
        failure = None

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if c["eval_every"] and step % c["eval_every"] == 0 and step < state.max_steps and trainer.val:
                control.should_evaluate = True
            opt = trainer.raw_optimizer
            if opt is not None and opt.skipped_in_a_row >= c["max_nonfinite_in_a_row"]:
                self.failure = (f"training stopped: the loss or gradient was NaN/inf at {opt.skipped_in_a_row} steps "
                                f"in a row, up to step {step}; no update was applied at those steps. Lower the "
                                "learning rate or check the data.")
                control.should_training_stop = True
            if max_steps and step >= max_steps:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            step = state.global_step
            first_desktop_step = (step - 1) * trainer.accelerator.num_processes
            memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and not args.use_cpu else 0
            log.step(step, int(epoch_of_step[min(first_desktop_step, len(epoch_of_step) - 1)]), logs["loss"],
                     logs.get("learning_rate"), logs.get("grad_norm"), trainer.step_tokens,
                     bool(trainer.raw_optimizer and trainer.raw_optimizer.skipped_last), memory)

    return Desktop()


def load_job(job_dir: Path) -> dict:
    path = job_dir / "job.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass --job with the folder `lora-lab export-job` wrote")
    job = json.loads(path.read_text(encoding="utf-8"))
    if job.get("format") != JOB_FORMAT:
        raise SystemExit(f"{path}: job format {job.get('format')!r}; this script reads format {JOB_FORMAT}")
    return job


def model_reference(args, job: dict) -> str:
    if args.model:
        return args.model
    ref = job["model"]
    local = args.job / ref
    return str(local) if not Path(ref).is_absolute() and local.exists() else ref


def main(argv=None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainingArguments

    job_dir = args.job.resolve()
    args.job = job_dir
    job = load_job(job_dir)
    c, lora = job["config"], job["config"]["lora"]
    output = (args.output or job_dir / "output").resolve()
    data = job_dir / "data"
    ids = np.load(data / "train_input_ids.npy", mmap_mode="r")
    labels = np.load(data / "train_labels.npy", mmap_mode="r")
    plan = np.load(data / "plan.npy")
    epoch_of_step = np.load(data / "plan_epochs.npy")

    targs = TrainingArguments(
        output_dir=str(output / "checkpoints"), per_device_train_batch_size=1, gradient_accumulation_steps=plan.shape[1],
        learning_rate=c["lr"], lr_scheduler_type=SCHEDULERS[c["schedule"]], warmup_steps=c["warmup_steps"],
        max_grad_norm=c["max_grad_norm"], weight_decay=c["optim"]["weight_decay"], adam_beta1=c["optim"]["beta1"],
        adam_beta2=c["optim"]["beta2"], adam_epsilon=c["optim"]["eps"], seed=c["seed"], data_seed=c["seed"],
        max_steps=1, logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False, eval_strategy="no",
        save_strategy="steps" if c["save_every"] else "no", save_steps=c["save_every"] or 500,
        save_total_limit=c["keep_checkpoints"], report_to="none", remove_unused_columns=False,
        train_sampling_strategy="sequential", dataloader_drop_last=False, ddp_find_unused_parameters=False,
        use_cpu=args.cpu, bf16=args.bf16, disable_tqdm=True,
        **({"activation_checkpointing": True} if args.gradient_checkpointing else {}))
    processes = targs.world_size
    train = PlanDataset(ids, labels, plan, processes, job["pad_id"])
    targs.max_steps = train.steps
    val_ids = np.load(data / "val_input_ids.npy", mmap_mode="r")
    val_labels = np.load(data / "val_labels.npy", mmap_mode="r")
    B = plan.shape[2]
    val = [micro_batch(val_ids, val_labels, np.arange(i, min(i + B, len(val_ids))), job["pad_id"])
           for i in range(0, len(val_ids), B)]
    empty = micro_batch(val_ids, val_labels, np.full(B, -1), job["pad_id"])
    val += [empty] * (-len(val) % processes) if val else []   # every process runs as many forwards (FSDP)

    model_ref = model_reference(args, job)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype)
    peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=list(lora["targets"]), use_rslora=lora["use_rslora"], bias="none",
                             task_type="CAUSAL_LM")
    model = get_peft_model(base, peft_config)
    initial = load_file(str(job_dir / "initial_adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, initial)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise SystemExit(f"initial_adapter/ does not fit {model_ref}: unexpected {result.unexpected_keys[:3]}, "
                         f"missing {missing[:3]}")
    if args.gradient_checkpointing:
        model.enable_input_require_grads()

    log = JsonLog(output / "log.jsonl", targs.process_index == 0, train.steps)
    trainer = build_trainer_class()(model=model, args=targs, train_dataset=train, data_collator=first_item)
    trainer.setup(job, val, log)
    callback = build_callback(trainer, log, job, epoch_of_step, args.max_steps)
    trainer.add_callback(callback)
    if getattr(trainer.accelerator.state, "fsdp_plugin", None) is not None:
        from peft.utils.other import fsdp_auto_wrap_policy   # wrap LoRA layers apart from the frozen weights
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)

    trainer.train()
    if val and (log.last_eval is None or log.last_eval[0] != trainer.state.global_step):
        trainer.evaluate()
    model.peft_config["default"].base_model_name_or_path = job["base_model"]
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(output))
    device = "cpu" if args.cpu or not torch.cuda.is_available() else torch.cuda.get_device_name()
    backend = f"accelerate: {processes} process(es), {trainer.accelerator.distributed_type.value}, {device}"
    stopped = bool(args.max_steps) and trainer.state.global_step < train.steps
    log.summary(output, stopped, backend, callback.failure)
    trainer.accelerator.wait_for_everyone()
    leave_process_group()
    if callback.failure:
        print(callback.failure, file=sys.stderr)
        return 1
    return 0


def leave_process_group() -> None:
    """Destroy the torch.distributed group (once every process is done) before the interpreter exits. Left to exit,
    gloo's threads can be torn down mid-use: "terminate called without an active exception", SIGABRT, and a failed
    run after the adapter was saved (seen once in CI with 2 CPU processes)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
