"""`lora-lab export-job`: the training run as a folder for PyTorch + Hugging Face accelerate (a GPU, a cluster)."""
from __future__ import annotations

import sys

from engine.commands.train import add_training_options, plan_from_args
from engine.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-job", help="write the training run as a job for accelerate (GPU servers, clusters)",
        description="Write a self-contained folder that trains the same adapter on PyTorch + Hugging Face "
                    "accelerate (DDP, FSDP, DeepSpeed ZeRO-2) with transformers' Trainer and PEFT: the rendered "
                    "data, train.py, accelerate configs, requirements.txt, a README and an sbatch template. The "
                    "job writes a PEFT adapter that lora-lab opens as it is (chat, eval, export, --init-adapter).")
    add_training_options(p, out_help="the job folder to write (new or empty)")
    p.add_argument("--copy-model", action="store_true",
                   help="copy the base model's files into the job (model/), so the folder needs nothing else")
    p.add_argument("--force", action="store_true", help="write into a job folder that is not empty")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.train.job import export_job
    from engine.train.runs import RunInputs

    if not args.data:
        raise UserError("no training data: pass --data FILE (repeat it for several files)")
    if args.init_adapter and any(v is not None for v in (args.rank, args.alpha, args.targets, args.rslora)):
        raise UserError("--init-adapter brings its own rank, alpha and targets; drop --rank/--alpha/--targets/"
                        "--rslora")
    log = lambda m: print(m, file=sys.stderr, flush=True)     # noqa: E731
    # The job runs on GPUs (accelerate): planned as for a GPU.
    config, val_split = plan_from_args(args, log, for_gpu=True)
    inputs = RunInputs(model=args.model, data=tuple(args.data), val_data=tuple(args.val_data),
                       val_split=val_split, mask_prompt=False if args.no_mask_prompt else None,
                       packing=args.packing, init_adapter=args.init_adapter)
    summary = export_job(config, inputs, args.out, copy_model=args.copy_model, overwrite=args.force, log=log)
    print(summary.folder)
    return 0
