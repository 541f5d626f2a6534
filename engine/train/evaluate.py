"""Perplexity of a base model, with or without an adapter, on files: what `lora-lab eval` and the window's
evaluation both call."""
from __future__ import annotations

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig, init_lora_state
from engine.lora.adalora_write import plain_lora_folder
from engine.lora.peft_read import inference_state
from engine.model.spec import load_model_spec
from engine.model.weights import check_weights_fit, open_weights
from engine.train.perplexity import strided_perplexity
from engine.model.references import resolve_model
from engine.train.runs import backend_factory, eval_stream


def evaluate(model: str, data, adapter: str | None = None, seq_len: int = 512, stride: int | None = None,
             mask_prompt: bool | None = None, backend: str = "auto", factory=None, progress=None):
    """The Perplexity of `model` (+ `adapter`) on the files `data`."""
    model_dir = resolve_model(model)
    spec = load_model_spec(model_dir)
    check_weights_fit(spec, open_weights(model_dir))   # headers only: damaged or mismatched weights stop here
    if not 2 <= seq_len <= spec.max_positions:
        raise ValueError(f"seq-len must be between 2 and the model's {spec.max_positions} positions, got {seq_len}")
    if adapter:
        # Any readable adapter, per-module ranks too (an adaptive-rank run's): evaluation only runs forward.
        lora, state = inference_state(plain_lora_folder(adapter), spec)
    else:
        # The base alone: the smallest adapter, with B = 0 so its output is exactly the base model's.
        lora = LoraConfig(rank=1, alpha=1.0, targets=spec.lora_targets[:1])   # q_proj (Phi-3: qkv_proj)
        state = init_lora_state(spec, lora)
    ids, labels = eval_stream(data, model_dir, mask_prompt)
    window = min(seq_len, ids.size)
    make = factory or backend_factory(backend, model_dir)
    with make(lora, OptimizerConfig(), 1, window, seed=0, init_state=state) as engine:
        return strided_perplexity(engine, ids, labels, window=window, stride=min(stride or window // 2 or 1, window),
                                  progress=progress)
