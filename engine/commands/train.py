"""`lora-lab train`: a LoRA training run from the command line, with a progress bar or JSON lines."""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

from engine import jsonout
from engine.errors import UserError
from engine.backends.base import MATH_CHOICES, OPTIMIZERS, OptimizerConfig
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig
from engine.model.hf_names import LORA_TARGETS
from engine.model.weight_formats import WEIGHT_CHOICES
from engine.train.schedule import SCHEDULES
from engine.train.config import TrainConfig
from engine.train.trainer import TrainerCallback, TrainingError


# --adaptive-rank's settings: (option, AdaLoraSettings field, type, help).
ADAPTIVE_OPTIONS = (
    ("--init-rank", "init_r", int, "rank every projection starts with"),
    ("--target-rank", "target_r", int, "average rank per projection at the end"),
    ("--tinit", "tinit", int, "steps before pruning starts"),
    ("--tfinal", "tfinal", int, "last steps trained with the final ranks fixed"),
    ("--delta-t", "deltaT", int, "steps between budget allocations"),
    ("--orth-reg-weight", "orth_reg_weight", float, "weight of the orthogonality regulariser"),
    ("--ipt-beta1", "beta1", float, "EMA factor of the importance (sensitivity)"),
    ("--ipt-beta2", "beta2", float, "EMA factor of the importance's uncertainty"),
)


def register(subparsers):
    p = subparsers.add_parser("train", help="train a LoRA adapter on your data",
                              description="Train a LoRA adapter and write it, in PEFT's layout, to --out "
                                          "(checkpoints in --out/checkpoints).")
    add_training_options(p, out_help="where the adapter (and checkpoints/) go")
    p.add_argument("--resume", metavar="CHECKPOINT_DIR",
                   help="continue an interrupted run (its settings come from the checkpoint)")
    p.add_argument("--backend", default="auto", metavar="auto|cpu|wgpu|wgpu:NAME",
                   help="training backend; auto measures the candidates and takes the fastest (default auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per step and evaluation, then a summary")
    p.set_defaults(func=run_train)


def add_training_options(p, out_help: str) -> None:
    """The options that define a run (model, data, adapter, training, evaluation): `train` and `export-job`."""
    p.add_argument("--model", required=True, metavar="M", help="model folder, .gguf file, hub id or 'demo'")
    p.add_argument("--data", action="append", default=[], metavar="F",
                   help="training file (.txt .md .jsonl .json .csv); repeat for several")
    p.add_argument("--out", required=True, metavar="DIR", help=out_help)
    lora = p.add_argument_group("adapter")
    lora.add_argument("--rank", type=int, default=None, help="LoRA rank r (default 16)")
    lora.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 32)")
    lora.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0.0)")
    lora.add_argument("--targets", default=None, metavar="all|q_proj,v_proj,...",
                      help=f"projections to adapt (default all: {','.join(LORA_TARGETS)}; on Phi-3 these mean its "
                           "fused qkv_proj,o_proj,gate_up_proj,down_proj, which may be named too)")
    lora.add_argument("--rslora", action="store_true", default=None, help="rank-stabilised scaling alpha/sqrt(r)")
    lora.add_argument("--init-adapter", metavar="DIR", help="continue training this PEFT adapter")
    ada = p.add_argument_group("adaptive rank (AdaLoRA: rank moves to the projections that need it)")
    ada.add_argument("--adaptive-rank", action="store_true",
                     help="train AdaLoRA (PEFT's AdaLoraModel): every projection starts at --init-rank and triplets "
                          "are pruned toward an average --target-rank; writes a PEFT AdaLoRA adapter and, in "
                          "lora-rank-pattern/, the same as an ordinary LoRA with per-module ranks")
    defaults = AdaLoraSettings()
    for option, name, kind, text in ADAPTIVE_OPTIONS:
        ada.add_argument(option, dest=f"ada_{name}", type=kind, default=None,
                         help=f"{text} (default {getattr(defaults, name)}; needs --adaptive-rank)")
    run = p.add_argument_group("training")
    run.add_argument("--seq-len", type=int, default=None,
                     help="tokens per sequence (default: planned from the data, the longest example rounded up)")
    run.add_argument("--batch-size", type=int, default=None,
                     help="sequences per micro-batch (default: planned, 8 on a GPU, 4 on the CPU)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default %(default)s)")
    memory = p.add_argument_group("GPU memory (lora-lab plan shows what these choose)")
    memory.add_argument("--weights", default="auto", choices=("auto",) + WEIGHT_CHOICES,
                        help="format of the frozen weights on the GPU: auto (bf16 up to ~1B parameters, else 8 or "
                             "4 bits as the memory needs; a GGUF keeps its own), stored, f32, bf16, f16, q8, q4")
    memory.add_argument("--recompute", choices=("auto", "on", "off"), default="auto",
                        help="activation recompute (WGSL backend): keep only each layer's input and run its "
                             "forward again in the backward; same gradients, far less memory, ~1 more forward a "
                             "step (default auto: on only when the run would not fit otherwise)")
    memory.add_argument("--math", choices=MATH_CHOICES, default="f32",
                        help="arithmetic of the frozen-weight products (WGSL backend): f16 multiplies weights held "
                             "f16 or bf16 in half precision with f32 accumulation (needs shader-f16; LoRA and "
                             "its gradients stay f32); default %(default)s")
    memory.add_argument("--gpu-memory", metavar="SIZE", help="plan for this much GPU memory, e.g. 8GB (default: "
                                                             "read from the driver where it can be)")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None,
                        help="passes over the data (default: planned from the data size; a few dozen examples "
                             "get enough passes for ~100 steps)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps, instead of --epochs")
    run.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: planned, 2e-4, or 5e-4 under 1B parameters)")
    run.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="(default %(default)s)")
    run.add_argument("--warmup", type=int, default=None, help="warmup steps (default: planned, 5%% of the steps)")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="(default %(default)s)")
    run.add_argument("--weight-decay", type=float, default=0.0, help="(default %(default)s)")
    run.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    run.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    prefs = p.add_argument_group("preference tuning (data: records with 'chosen' and 'rejected')")
    prefs.add_argument("--objective", choices=("sft", "dpo", "orpo"), default="sft",
                       help="sft: next-token loss; dpo: DPO (sigmoid) against the base model with the adapter off; "
                            "orpo: odds ratio + SFT on the chosen answers, no reference (default %(default)s). "
                            "With dpo/orpo --batch-size counts rows, two per pair; peers use lr 5e-6..5e-5")
    prefs.add_argument("--beta", type=float, default=0.1, help="DPO beta (default %(default)s)")
    prefs.add_argument("--label-smoothing", type=float, default=0.0,
                       help="DPO label smoothing in [0, 0.5) (default %(default)s)")
    prefs.add_argument("--orpo-lambda", type=float, default=0.1, help="ORPO lambda (default %(default)s)")
    prefs.add_argument("--reference-logps", choices=("auto", "cached", "per-step"), default="auto",
                       help="DPO: the reference's log-probabilities cached once per pair (the reference never "
                            "changes), or a reference pass every step; auto caches when a pair is seen twice "
                            "(default %(default)s)")
    data = p.add_argument_group("data and evaluation")
    data.add_argument("--val-split", type=float, default=None,
                      help="fraction of the data held out (default: planned, 0.1 from 50 examples)")
    data.add_argument("--val-data", action="append", default=[], metavar="F", help="validation-only file")
    data.add_argument("--eval-every", type=int, default=None,
                      help="evaluate every N steps (and at the end; default: planned, 4 times a run)")
    data.add_argument("--no-mask-prompt", action="store_true", help="train on prompts too, not only answers")
    data.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default %(default)s)")


def _targets(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip() == "all":
        return LORA_TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def adaptive_from_args(args) -> AdaLoraSettings | None:
    """--adaptive-rank's settings (total_step is the run's length, filled in when the run starts), or None."""
    given = {name[len("ada_"):]: value for name, value in vars(args).items()
             if name.startswith("ada_") and value is not None}
    if not getattr(args, "adaptive_rank", False):
        if given:
            options = [option for option, name, _, _ in ADAPTIVE_OPTIONS if name in given]
            raise UserError(f"{', '.join(options)}: these settings are AdaLoRA's; add --adaptive-rank")
        return None
    if getattr(args, "init_adapter", None):
        raise UserError("--adaptive-rank starts its own SVD-shaped adapter; --init-adapter (a LoRA to continue) "
                        "cannot seed it: drop one of them")
    return AdaLoraSettings(**given)


def lora_from_args(args) -> LoraConfig:
    adaptive = adaptive_from_args(args)
    rank = adaptive.init_r if adaptive is not None and args.rank is None else args.rank   # AdaLoRA's: init_r
    chosen = {"rank": rank, "alpha": args.alpha, "dropout": args.dropout, "targets": _targets(args.targets),
              "use_rslora": args.rslora}
    return LoraConfig(**{k: v for k, v in chosen.items() if v is not None})


# Options whose default is planned from the data (engine.train.recommend), as the wizard plans them.
PLANNED = {"seq_len": "seq_len", "batch_size": "batch_size", "epochs": "epochs", "lr": "lr",
           "warmup": "warmup_steps", "eval_every": "eval_every"}


def config_from_args(args, planned: TrainConfig | None = None) -> TrainConfig:
    """The run's settings: what the options give, and for the planned ones left out, `planned`'s values."""
    base = planned or TrainConfig()

    def pick(option):
        value = getattr(args, option)
        return getattr(base, PLANNED[option]) if value is None else value

    return TrainConfig(
        lora=lora_from_args(args),
        optim=OptimizerConfig(name=args.optimizer, weight_decay=args.weight_decay),
        batch_size=pick("batch_size"), grad_accum=args.grad_accum, seq_len=pick("seq_len"),
        epochs=pick("epochs"), max_steps=args.steps or 0, lr=pick("lr"), schedule=args.schedule,
        warmup_steps=pick("warmup"), max_grad_norm=args.max_grad_norm, seed=args.seed,
        eval_every=pick("eval_every"), save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        weights=args.weights, objective=args.objective, beta=args.beta, label_smoothing=args.label_smoothing,
        orpo_lambda=args.orpo_lambda, recompute={"auto": None, "on": True, "off": False}[args.recompute],
        reference_logps=args.reference_logps, adaptive_rank=adaptive_from_args(args), math=args.math)


def plan_from_args(args, log, for_gpu: bool | None = None) -> tuple[TrainConfig, float]:
    """(TrainConfig, validation fraction): the options given, the rest planned from the data and the model by
    engine.train.recommend.default_plan, the same planner as the wizard's; the plan is logged. `for_gpu` None:
    as the --backend option (auto: a hardware GPU was detected)."""
    from engine.train.runs import RunInputs, check_seq_len

    # What the options get wrong is refused before the corpus is read for the plan.
    RunInputs(model=args.model, data=tuple(args.data) or ("(from the checkpoint)",), val_data=tuple(args.val_data),
              val_split=args.val_split or 0.0, backend=getattr(args, "backend", "auto"))
    given_val = 0.0 if args.val_data else args.val_split
    if getattr(args, "resume", None) or (given_val is not None and all(getattr(args, o) is not None
                                                                        for o in PLANNED)):
        return config_from_args(args), given_val or 0.0
    from engine.backends.choose import parse_backend_kind
    from engine.model.references import resolve_for_adapter
    from engine.model.spec import load_model_spec
    from engine.train.recommend import default_plan, describe_plan, has_hardware_gpu, paced, total_steps

    model_dir, _ = resolve_for_adapter(args.model, log=log)
    spec = load_model_spec(model_dir)
    if args.seq_len is not None:
        check_seq_len(spec, args.seq_len)
    if for_gpu is None:
        kind = parse_backend_kind(args.backend)[0]
        if kind == "auto":
            from engine.backends.hardware import detect

            for_gpu = has_hardware_gpu(detect())
        else:
            for_gpu = kind == "wgpu"
    planned, val_split, summary = default_plan(args.data, model_dir, spec, for_gpu)
    val_split = val_split if given_val is None else given_val
    # Warmup and evaluations follow the run's length as given (--steps, --epochs, --batch-size), not the plan's.
    given = config_from_args(args, planned)
    planned = paced(planned, total_steps(given, summary.examples(given), val_split))
    config = config_from_args(args, planned)
    log(describe_plan(config, summary, val_split))
    return config, val_split


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar(TrainerCallback):
    """One redrawn line on a terminal (stderr); evaluations and checkpoints get lines of their own."""

    def __init__(self, stream=None, width: int = 24):
        self.stream, self.width, self._last = stream or sys.stderr, width, 0.0

    def on_step(self, e):
        now = time.monotonic()
        if now - self._last < 0.1 and e.step != e.total:
            return
        self._last = now
        filled = int(self.width * e.step / e.total)
        bar = "#" * filled + "." * (self.width - filled)
        loss = "skipped (non-finite)" if e.skipped else f"loss {e.loss:.4f}"
        if e.reward_margin is not None and not e.skipped:
            loss += f" margin {e.reward_margin:+.3f} acc {e.reward_accuracy:.2f}"
        if e.rank_map is not None:
            loss += f" rank {sum(map(sum, e.rank_map))}"
        self.stream.write(f"\r[{bar}] {e.step}/{e.total} {loss} lr {e.lr:.2e} {e.tokens_per_s:,.0f} tok/s "
                          f"{_duration(e.elapsed_s)} ETA {_duration(e.eta_s)} mem {e.memory_bytes / 2**20:,.0f} MiB ")
        self.stream.flush()

    def on_eval(self, e):
        quality = f"perplexity {e.perplexity:.3f}" if e.reward_margin is None else \
            f"reward margin {e.reward_margin:+.4f}, reward accuracy {e.reward_accuracy:.3f}"
        self.stream.write(f"\n  eval at step {e.step}: loss {e.loss:.4f}, {quality} ({e.tokens} tokens)\n")

    def on_checkpoint(self, e):
        self.stream.write(f"\n  checkpoint: {e.path}\n")

    def on_finish(self, summary):
        self.stream.write("\n")

    def on_failure(self, step, message):
        self.stream.write("\n")


class JsonLines(TrainerCallback):
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def _emit(self, obj):
        self.stream.write(jsonout.dumps(obj, default=str) + "\n")
        self.stream.flush()

    def on_step(self, e):
        self._emit({"event": "step", "step": e.step, "total": e.total, "epoch": e.epoch,
                    "loss": e.loss if math.isfinite(e.loss) else None, "lr": e.lr,
                    "grad_norm": e.grad_norm if math.isfinite(e.grad_norm) else None, "tokens": e.tokens,
                    "tokens_per_s": e.tokens_per_s, "elapsed_s": e.elapsed_s, "eta_s": e.eta_s,
                    "memory_bytes": e.memory_bytes, "skipped": e.skipped, **_rewards(e),
                    **({"rank_map": e.rank_map} if e.rank_map is not None else {})})

    def on_eval(self, e):
        self._emit({"event": "eval", "step": e.step, "loss": e.loss,
                    "perplexity": e.perplexity if math.isfinite(e.perplexity) else None, "tokens": e.tokens,
                    **_rewards(e)})


def _rewards(e) -> dict:
    """DPO/ORPO steps and evaluations: reward margin and accuracy (absent for SFT; None where not finite)."""
    if e.reward_margin is None:
        return {}
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731
    return {"reward_margin": finite(e.reward_margin), "reward_accuracy": finite(e.reward_accuracy)}


def _record(prepared, model: str, data: tuple[str, ...], summary) -> list[str]:
    """Add the run to the runs list the window reopens (engine.train.history), as a run from the window is; a list
    that cannot be written is a note, never a failed run."""
    from engine.train.history import RunRecord, now_utc, record_run, summary_metrics

    record = RunRecord(str(Path(summary.adapter_dir).resolve()), model, str(Path(prepared.model_dir).resolve()),
                       tuple(str(Path(f).resolve()) for f in data), prepared.trainer.config.to_dict(),
                       summary_metrics(summary), now_utc())
    try:
        return record_run(record)
    except OSError as exc:
        return [f"the run could not be added to the runs list: {exc}"]


def run_train(args) -> int:
    from engine.train.memory_fit import parse_bytes
    from engine.train.runs import RunInputs, prepare_run

    if not args.data and not args.resume:
        raise UserError("no training data: pass --data FILE (repeat it for several files)")
    if args.resume and args.init_adapter:
        raise UserError("--resume continues a run with its own adapter; drop --init-adapter")
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    config, val_split = plan_from_args(args, log)
    if args.init_adapter and any(v is not None for v in (args.rank, args.alpha, args.targets, args.rslora)):
        raise UserError("--init-adapter brings its own rank, alpha and targets; drop --rank/--alpha/--targets/"
                        "--rslora")
    data, val_data = tuple(args.data), tuple(args.val_data)
    if args.resume and not data:
        data, val_data = _files_from_checkpoint(args.resume)
    inputs = RunInputs(model=args.model, data=data, val_data=val_data, val_split=val_split,
                       mask_prompt=False if args.no_mask_prompt else None, packing=args.packing,
                       init_adapter=args.init_adapter, backend=args.backend,
                       gpu_memory=parse_bytes(args.gpu_memory) if args.gpu_memory else None)
    callback = JsonLines() if args.json else (ProgressBar() if sys.stderr.isatty() else TrainerCallback())
    try:
        prepared = prepare_run(config, inputs, args.out, callback=callback, resume=args.resume, log=log)
        trainer = prepared.trainer
        if not args.json:
            t, c = prepared.corpus_stats.train, trainer.config
            rows = f"{t.sequences // 2} pairs ({c.objective})" if c.objective != "sft" else f"{t.sequences} sequences"
            print(f"training {prepared.base_model}: {rows}, {t.trainable_tokens} trained tokens, "
                  f"{trainer.total_steps} steps ({c.epochs} epochs of batch {c.batch_size} x {c.grad_accum} "
                  f"accumulation x {c.seq_len} tokens, lr {c.lr:g} {c.schedule}, {c.warmup_steps} warmup)",
                  file=sys.stderr)
        previous = signal.signal(signal.SIGINT, lambda *_: _interrupt(trainer, previous))
        try:
            summary = trainer.run()
        finally:
            signal.signal(signal.SIGINT, previous)
    except TrainingError as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:       # a backend that cannot run here (no device, out of device memory, ...)
        raise UserError(f"training failed: {exc}") from None
    from engine.train.recommend import training_advice

    advice = training_advice(summary.losses, trainer.config, summary.stopped)
    for note in _record(prepared, args.model, data, summary):
        log(f"note: {note}")
    if args.json:
        JsonLines()._emit({**summary.to_json(), "advice": advice})
    else:
        losses = f"loss {summary.first_loss:.4f} -> {summary.final_loss:.4f} (mean of the last 10 steps)" \
            if summary.first_loss is not None \
            else "no step applied"
        evals = f", eval perplexity {summary.eval_perplexity:.3f}" if summary.eval_perplexity else ""
        print(f"{'stopped' if summary.stopped else 'done'}: {summary.steps}/{summary.total_steps} steps, {losses}"
              f"{evals}, {summary.elapsed_s:.1f} s; adapter in {summary.adapter_dir}", file=sys.stderr)
        for line in advice:
            print(f"  {line}", file=sys.stderr)
    return 0


def _interrupt(trainer, previous):
    """First Ctrl-C: stop after this step, checkpoint and write the adapter. A second one aborts."""
    print("\nstopping after this step (Ctrl-C again to abort)...", file=sys.stderr)
    trainer.stop()
    signal.signal(signal.SIGINT, previous)


def _files_from_checkpoint(resume) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The data and validation files an interrupted run was started with."""
    from pathlib import Path

    from engine.train.checkpoint import STATE, checkpoint_root, latest_checkpoint, verify_checkpoint

    path = Path(resume)
    if not (path / "manifest.json").exists():
        path = latest_checkpoint(path) or latest_checkpoint(checkpoint_root(path)) or path
    verify_checkpoint(path)
    saved = json.loads((path / STATE).read_text(encoding="utf-8")).get("inputs") or {}
    if not saved.get("data"):
        raise ValueError(f"{path}: the checkpoint does not name its data files; pass --data again")
    return tuple(saved["data"]), tuple(saved.get("val_data") or ())
