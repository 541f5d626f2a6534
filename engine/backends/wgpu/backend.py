"""The WGSL training backend: a Hugging Face model + LoRA + optimizer on one wgpu device.

Everything (buffers, pipelines, bind groups) is created in the constructor; a training step writes the tokens
and a few per-step constants, encodes forward, LM head, backward (per micro-batch), loss reduction, gradient
norm and the optimizer update into one command encoder, and submits. Nothing is read back inside the step:
`train_step` returns a PendingStep that reads the step's stats (copied to a small history ring) when asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from engine.backends.base import (IGNORE_LABEL, OptimizerConfig, PendingStep, PreferenceStepResult, StepResult,
                                  TrainingBackend, check_batch, counted_tokens, shift_labels)
from engine.backends.preference import (PreferenceLoss, PreferenceObjective, join_pairs, preference_loss,
                                        split_pairs)
from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.tuning import GemmTuner
from engine.backends.wgpu.uniforms import uniform_struct, upload_uniform
from engine.backends.wgpu.kernels.linear_f16 import F16_WEIGHT_LIMIT, f16_math_ok
from engine.backends.wgpu.kernels.lm_head import chunk_rows
from engine.backends.wgpu.kernels.optimizer import GradNorm, Optimizer
from engine.lora.config import LoraConfig, fit_targets, init_lora_state
from engine.model.spec import ModelSpec, load_model_spec
from engine.model.weights import ArrayWeights, WeightSource, open_weights, split_fused
from engine.backends.wgpu.backward import model_backward
from engine.backends.wgpu.buffers import (HISTORY_SLOTS, STAGE_SLOTS, STATS_FLOATS, Scratch, allocate,
                                          allocate_activations, destroy, formats_for, lora_layout, move_flat,
                                          scratch_shapes, vocab_pieces)
from engine.backends.wgpu.forward import model_forward
from engine.backends.wgpu.graph import build_model
from engine.backends.wgpu.weights import ModelWeights, upload_weights


DROPOUT_STEP_KEY = "lora_dropout_step"
DROPOUT_STEP = uniform_struct("lora", "Step")   # (seed, p) of LoRA dropout, written per step


def check_f16_math(ctx: GpuContext, weights: ModelWeights, choice: str) -> None:
    """Refuse math f16 where it would compute nothing in f16: no shader-f16, or no projection it may use."""
    if not ctx.has_f16:
        raise ValueError(f"math f16 needs an adapter with shader-f16; {ctx.label} has none: use math f32")
    held = [getattr(layer, name) for layer in weights.layers for name in ("q", "k", "v", "o", "gate", "up", "down")]
    if not any(f16_math_ok(w.format, w.abs_max) for w in held):
        raise ValueError(f"math f16 found no projection weight it may multiply in f16 (weights {choice!r}; they "
                         f"must be held f16 or bf16 with max |w| <= {F16_WEIGHT_LIMIT:g}): use weights f16 or "
                         "bf16, or math f32")


class WgpuBackend(TrainingBackend):
    """Sized once for [batch_size, seq_len]; smaller micro-batches are padded (padding never counts).

    Memory: engine.backends.wgpu.memory.memory_plan(spec, lora, optim, B, T, recompute=...) says beforehand what
    this allocates.
    """

    def __init__(self, model: str | Path | ModelSpec, lora: LoraConfig, optim: OptimizerConfig, batch_size: int,
                 seq_len: int, ctx: GpuContext | None = None, lora_state: dict | None = None, seed: int = 0,
                 tensors: dict[str, np.ndarray] | WeightSource | None = None, max_binding_bytes: int | None = None,
                 weights: str = "f32", recompute: bool = False, math: str = "f32"):
        """`model`: a Hugging Face folder (weights read tensor by tensor: engine.model.weights.open_weights), or a
        ModelSpec with `tensors` (a WeightSource, or {HF name: array} such as
        engine.backends.wgpu.microbench.random_weights) for benchmarks without files.
        `max_binding_bytes` lowers the adapter's storage-binding limit (tests of the vocabulary split).
        `weights` is the format the frozen matrices are held in (engine.model.weight_formats.WEIGHT_CHOICES):
        converted on load, tensor by tensor; "stored" keeps the model file's own (a GGUF's quantization).
        `recompute` (activation recompute, gradient checkpointing): keep only each layer's output and one
        layer's activations, and run each layer's forward again before its backward; the gradients are the
        same bits, for about one more forward pass per step.
        `math` "f16" multiplies the projections' frozen weights held f16 or bf16 in half precision (f32
        accumulation; kernels.linear_f16 states the error): it needs an adapter with shader-f16 and `weights`
        that hold at least one projection in f16/bf16; weights beyond the f16 limit keep f32 math."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch size and sequence length must be >= 1, got {batch_size}, {seq_len}")
        if isinstance(model, ModelSpec):
            if tensors is None:
                raise ValueError("a ModelSpec without a folder needs its weights passed as tensors")
            self.spec = model
        else:
            self.spec = load_model_spec(model)
            tensors = tensors if tensors is not None else open_weights(model)
        source = tensors if isinstance(tensors, WeightSource) else ArrayWeights(tensors, self.spec.source)
        source = split_fused(source)        # Phi-3's fused projections also under their members' names
        if seq_len > self.spec.max_positions:
            raise ValueError(f"seq_len {seq_len} exceeds the model's {self.spec.max_positions} positions")
        lora = fit_targets(self.spec, lora)     # the default targets name Phi-3's fused projections
        self.lora, self.optim, self.batch_size, self.seq_len = lora, optim, batch_size, seq_len
        self.recompute = bool(recompute)
        self.ctx = ctx or GpuContext.create()
        if self.ctx.gemm_tuner is None:
            self.ctx.gemm_tuner = GemmTuner.for_context(self.ctx)
        self.name = f"wgpu: {self.ctx.label} ({self.ctx.adapter.info.get('backend_type', '?')})"
        self._bytes_before = self.ctx.bytes_allocated
        ctx, spec, BT = self.ctx, self.spec, batch_size * seq_len
        limit = min(ctx.max_binding_bytes, ctx.max_buffer_bytes, max_binding_bytes or ctx.max_binding_bytes)
        self.layout = lora_layout(spec, lora)
        self.saved_layout = lora_layout(spec, lora, grouped=False)   # optimizer states, in and out (move_flat)
        self.chunk = chunk_rows(BT, spec.vocab_size, limit, max_workgroups=ctx.max_workgroups)
        self.weight_choice = weights
        format_of = formats_for(weights, {n: t.format for n, t in source.stored().items()})
        self.weights = upload_weights(ctx, spec, source, limit, format_of, abs_max=math == "f16")
        self.acts = allocate_activations(ctx, spec, lora, batch_size, seq_len, self.recompute)
        piece_rows = vocab_pieces(spec.vocab_size, spec.hidden, limit, self.weights.vocab_format)[0][1]
        self.scratch: Scratch = allocate(ctx, Scratch, scratch_shapes(spec, lora, batch_size, seq_len, self.chunk,
                                                                      piece_rows), "scratch")
        self._ones = np.ones(batch_size * seq_len, np.float32)   # row_weight of every supervised step
        ctx.write(self.scratch.row_weight, self._ones)
        self.dropout_step = upload_uniform(ctx, "lora", "Step", "lora_dropout.step", seed=0, p=0.0)
        self.math = math
        if math == "f16":
            check_f16_math(ctx, self.weights, weights)
        self.model = build_model(ctx, spec, lora, batch_size, seq_len, self.weights, self.acts, self.scratch,
                                 self.layout, self.chunk, self.dropout_step, self.recompute, math)
        if ctx.gemm_tuner is not None:
            ctx.gemm_tuner.release()
        s = self.scratch
        self.grad_norm = GradNorm(ctx, s.lora_grads, self.layout.total, s.stats)
        self.optimizer = Optimizer(ctx, optim, s.lora_params, s.lora_grads, self.layout.total, s.stats)
        self.load_lora_state(lora_state if lora_state is not None else init_lora_state(spec, lora, seed))
        self._seed = seed
        self._steps_submitted = 0
        self._dropout_steps = 0   # picks each step's dropout mask; saved with the optimizer so resume is exact
        self._pending: list[PendingStep | None] = [None] * HISTORY_SLOTS
        self._bytes = ctx.bytes_allocated - self._bytes_before

    # ---- tokens --------------------------------------------------------------------------------------------
    def _stage(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Write up to STAGE_SLOTS micro-batches, padded to [B, T] (padding never counts), to the staging rows."""
        B, T = self.batch_size, self.seq_len
        ids = np.zeros((len(batches), B, T), np.int32)
        targets = np.full((len(batches), B, T), IGNORE_LABEL, np.int32)
        for i, (input_ids, labels) in enumerate(batches):
            b, t = input_ids.shape
            ids[i, :b, :t] = input_ids
            targets[i, :b, :t] = shift_labels(labels)
        self.ctx.write(self.scratch.ids_stage, ids)
        self.ctx.write(self.scratch.targets_stage, targets)

    def _load_slot(self, enc, slot: int) -> None:
        nbytes = 4 * self.batch_size * self.seq_len
        s = self.scratch
        enc.copy(s.ids_stage, slot * nbytes, s.ids, 0, nbytes)
        enc.copy(s.targets_stage, slot * nbytes, s.targets, 0, nbytes)

    def _checked(self, micro_batches) -> list:
        out = []
        for input_ids, labels in micro_batches:
            input_ids, labels = np.asarray(input_ids, np.int32), np.asarray(labels, np.int32)
            check_batch(input_ids, labels, self.batch_size, self.seq_len, self.spec.vocab_size)
            out.append((input_ids, labels))
        return out

    # ---- training ------------------------------------------------------------------------------------------
    def encode_gradients(self, micro_batches) -> StepEncoder:
        """Forward, LM head and backward of every micro-batch, adding into lora_grads, and the loss into stats.

        Submits once per STAGE_SLOTS micro-batches (the staging rows are rewritten in between) and returns the
        last encoder, still open, for the caller to finish the step in.
        """
        batches = self._checked(micro_batches)
        if not batches:
            raise ValueError("a training step needs at least one micro-batch")
        counted = sum(counted_tokens(labels) for _, labels in batches)
        if counted == 0:
            raise ValueError("the step's micro-batches have no counted tokens (every shifted label is ignored)")
        self.model.lm_head.set_step(counted, with_grad=True)
        seed = (self._seed * 1_000_003 + self._dropout_steps) % (1 << 32)   # a new dropout mask every step
        self._dropout_steps += 1
        self.ctx.write(self.dropout_step, np.frombuffer(DROPOUT_STEP.pack(seed=seed, p=self.lora.dropout), np.uint8))
        for g0 in range(0, len(batches), STAGE_SLOTS):
            group = batches[g0:g0 + STAGE_SLOTS]
            self._stage(group)
            enc = self.ctx.encoder("train_step")
            for slot in range(len(group)):
                self._load_slot(enc, slot)
                model_forward(enc, self.model)
                self.model.lm_head.encode(enc, backward=True)
                model_backward(enc, self.model)
            if g0 + STAGE_SLOTS < len(batches):
                enc.submit()
        self.model.lm_head.encode_reduce(enc)
        return enc

    def train_step(self, micro_batches, lr: float, max_grad_norm: float) -> PendingStep:
        if not lr >= 0 or not max_grad_norm >= 0:
            raise ValueError(f"lr and max_grad_norm must be >= 0, got {lr}, {max_grad_norm}")
        slot = self._steps_submitted % HISTORY_SLOTS
        if self._pending[slot] is not None:
            self._pending[slot].result()   # its stats are about to be overwritten: read them now
        self.optimizer.set_hyper(lr, max_grad_norm)
        enc = self.encode_gradients(micro_batches)
        self.grad_norm.encode(enc)
        self.optimizer.encode(enc)
        enc.copy(self.scratch.stats, 0, self.scratch.history, slot * 4 * STATS_FLOATS, 4 * STATS_FLOATS)
        enc.submit()
        self._steps_submitted += 1
        pending = PendingStep(lambda: self._read_result(slot))
        self._pending[slot] = pending
        return pending

    def _read_result(self, slot: int) -> StepResult:
        stats = self.ctx.read(self.scratch.history, count=STATS_FLOATS, offset=slot * 4 * STATS_FLOATS)
        return StepResult(step=int(round(stats[4])), loss=float(stats[0]), tokens=int(round(stats[5])),
                          grad_norm=float(stats[1]), skipped=bool(stats[3] != 0))

    # ---- preference objectives ----------------------------------------------------------------------------
    def sequence_logps(self, input_ids: np.ndarray, labels: np.ndarray, adapter: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """A forward pass and the LM head without backward (inv_count 1: row_loss holds each position's CE),
        summed per row. Adapter off: the LoRA tensors are read back, zeroed for the pass and written back (a
        zero LoRA branch adds exactly 0), so the reference needs no second copy of anything on the device."""
        (batch,) = self._checked([(input_ids, labels)])
        saved = None
        if not adapter:
            saved = self.ctx.read(self.scratch.lora_params, count=self.layout.total)
            self.ctx.write(self.scratch.lora_params, np.zeros_like(saved))
        try:
            self._forward_only([batch], 1)
            enc = self.ctx.encoder("sequence_logps")
            self.model.lm_head.encode(enc, backward=False)
            enc.submit()
            ce = self.ctx.read(self.scratch.row_loss, count=self.batch_size * self.seq_len)
            enc = self.ctx.encoder("sequence_logps.reset")
            enc.encoder.clear_buffer(self.scratch.row_loss)
            enc.submit()
        finally:
            if saved is not None:
                self.ctx.write(self.scratch.lora_params, saved)
        b, t = batch[0].shape
        counted = shift_labels(batch[1]) != IGNORE_LABEL
        ce = ce.reshape(self.batch_size, self.seq_len)[:b, :t].astype(np.float64)
        return -np.where(counted, ce, 0.0).sum(1), counted.sum(1).astype(np.int64)

    def _preference_passes(self, micro_batches, objective: PreferenceObjective, reference=None
                           ) -> tuple[PreferenceLoss, int]:
        """The loss and ∂L/∂S on the host (engine.backends.preference) from forward passes, then forward + LM
        head + backward per micro-batch with row_weight = −∂L/∂S of each row, so lora_grads receives dL/dθ;
        stats[0] then holds the objective's loss for the optimizer's non-finite guard."""
        if self.lora.dropout > 0:
            raise ValueError(f"lora dropout {self.lora.dropout} with a preference objective: the log-probabilities "
                             "and the gradient are computed in separate passes, which would see different dropout "
                             "masks; set lora dropout to 0 for DPO/ORPO")
        batches = self._checked(micro_batches)
        if not batches:
            raise ValueError("a step needs at least one (input_ids, labels) micro-batch")
        measured = [self.sequence_logps(ids, labels) for ids, labels in batches]
        if not objective.needs_reference:
            reference = None
        elif reference is None:
            reference = join_pairs([self.sequence_logps(ids, labels, adapter=False)[0] for ids, labels in batches])
        else:                   # given per micro-batch (engine.train.reference)
            reference = join_pairs(list(reference))
        counts = join_pairs([c for _, c in measured])
        result = preference_loss(objective, join_pairs([s for s, _ in measured]), counts, reference)
        tokens = int(counts.sum())
        self.model.lm_head.set_step(tokens, with_grad=True, weighted=True)
        self.ctx.write(self.dropout_step, np.array([0.0], np.float32), offset=DROPOUT_STEP.offset("p"))
        for index, (batch, d) in enumerate(zip(batches, split_pairs(result.d_logps, [len(c) for _, c in measured]))):
            weight = np.zeros((self.batch_size, self.seq_len), np.float32)
            weight[:len(d)] = -d[:, None]
            self.ctx.write(self.scratch.row_weight, weight)     # queue-ordered: applies to this submit only
            self._stage([batch])
            enc = self.ctx.encoder("preference_passes")
            self._load_slot(enc, 0)
            model_forward(enc, self.model)
            self.model.lm_head.encode(enc, backward=True)
            model_backward(enc, self.model)
            if index == len(batches) - 1:
                self.model.lm_head.encode_reduce(enc)
            enc.submit()
        self.ctx.write(self.scratch.row_weight, self._ones)
        self.ctx.write(self.scratch.stats, np.array([result.loss], np.float32))
        return result, tokens

    def preference_gradients(self, micro_batches, objective: PreferenceObjective
                             ) -> tuple[PreferenceLoss, int, dict[str, np.ndarray]]:
        """(loss and metrics, completion tokens, LoRA gradients of the loss) without an update; for tests.
        Leaves the gradients zeroed."""
        result, tokens = self._preference_passes(micro_batches, objective)
        grads = self._read_flat(self.scratch.lora_grads)
        enc = self.ctx.encoder("zero_grads")
        enc.encoder.clear_buffer(self.scratch.lora_grads)
        enc.submit()
        return result, tokens, grads

    def preference_step(self, micro_batches, objective: PreferenceObjective, lr: float,
                        max_grad_norm: float, reference=None) -> PendingStep:
        """Synchronous: the host needs every row's log-probability before the backward can be weighted."""
        if not lr >= 0 or not max_grad_norm >= 0:
            raise ValueError(f"lr and max_grad_norm must be >= 0, got {lr}, {max_grad_norm}")
        result, tokens = self._preference_passes(micro_batches, objective, reference)
        self.optimizer.set_hyper(lr, max_grad_norm)
        enc = self.ctx.encoder("preference_update")
        self.grad_norm.encode(enc)
        self.optimizer.encode(enc)
        enc.submit()
        stats = self.ctx.read(self.scratch.stats, count=STATS_FLOATS)
        return PendingStep.done(PreferenceStepResult(
            step=int(round(stats[4])), loss=result.loss, tokens=tokens, grad_norm=float(stats[1]),
            skipped=bool(stats[3] != 0), pairs=result.pairs, reward_margin=result.reward_margin,
            reward_accuracy=result.reward_accuracy, chosen_reward=result.chosen_reward,
            rejected_reward=result.rejected_reward))

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        (batch,) = self._checked([(input_ids, labels)])
        counted = counted_tokens(batch[1])
        self._forward_only([batch], counted)
        enc = self.ctx.encoder("eval")
        self.model.lm_head.encode(enc, backward=False)
        self.model.lm_head.encode_reduce(enc)
        enc.submit()
        return float(self.ctx.read(self.scratch.stats, count=1)[0]), counted

    def _forward_only(self, batches, counted: int) -> None:
        self.model.lm_head.set_step(counted, with_grad=False)
        self.ctx.write(self.dropout_step, np.array([0.0], np.float32), offset=DROPOUT_STEP.offset("p"))  # no dropout
        self._stage(batches)
        enc = self.ctx.encoder("forward")
        self._load_slot(enc, 0)
        model_forward(enc, self.model)
        enc.submit()

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        input_ids = np.asarray(input_ids, np.int32)
        check_batch(input_ids, input_ids, self.batch_size, self.seq_len, self.spec.vocab_size)
        self._forward_only([(input_ids, input_ids)], 0)
        V, BT = self.spec.vocab_size, self.batch_size * self.seq_len
        rows = []
        for c in range(len(self.model.lm_head.chunks)):
            enc = self.ctx.encoder("logits")
            self.model.lm_head.encode_logits(enc, c)
            enc.submit()
            n = min(self.chunk, BT - c * self.chunk)
            rows.append(self.ctx.read(self.scratch.logits, count=n * V).reshape(n, V))
        b, t = input_ids.shape
        return np.concatenate(rows).reshape(self.batch_size, self.seq_len, V)[:b, :t]

    # ---- state ---------------------------------------------------------------------------------------------
    def _read_flat(self, buf) -> dict[str, np.ndarray]:
        flat = self.ctx.read(buf, count=self.layout.total)
        return {k: flat[o:o + int(np.prod(self.layout.shapes[k]))].reshape(self.layout.shapes[k]).copy()
                for k, o in self.layout.offsets.items()}

    def lora_state(self) -> dict[str, np.ndarray]:
        return self._read_flat(self.scratch.lora_params)

    def lora_state_before_update(self) -> dict[str, np.ndarray]:
        return self._read_flat(self.optimizer.previous)

    def gradients(self, micro_batches) -> tuple[float, int, dict[str, np.ndarray]]:
        """(mean loss, counted tokens, LoRA gradients under PEFT's names) of micro-batches, without updating
        anything (TrainingBackend.gradients). Reads the gradients back and leaves them zeroed."""
        self.encode_gradients(micro_batches).submit()
        loss = float(self.ctx.read(self.scratch.stats, count=1)[0])
        grads = self._read_flat(self.scratch.lora_grads)
        enc = self.ctx.encoder("zero_grads")
        enc.encoder.clear_buffer(self.scratch.lora_grads)
        enc.submit()
        return loss, sum(counted_tokens(labels) for _, labels in micro_batches), grads

    def load_lora_state(self, state: dict[str, np.ndarray]) -> None:
        missing = sorted(set(self.layout.offsets) - set(state))
        extra = sorted(set(state) - set(self.layout.offsets))
        if missing or extra:
            raise ValueError(f"LoRA state does not match this adapter: missing {missing[:3]}, unexpected {extra[:3]}"
                             f" ({len(missing)} missing, {len(extra)} unexpected)")
        flat = np.zeros(self.layout.total, np.float32)
        for key, offset in self.layout.offsets.items():
            value = np.asarray(state[key], np.float32)
            if value.shape != self.layout.shapes[key]:
                raise ValueError(f"LoRA tensor {key} has shape {value.shape}, expected {self.layout.shapes[key]}")
            flat[offset:offset + value.size] = value.reshape(-1)
        self.ctx.write(self.scratch.lora_params, flat)
        self.optimizer.remember(flat)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """In the ungrouped layout (lora_layout grouped=False), whatever this backend's grouping: a checkpoint
        means the same whichever LoRA groups wrote it."""
        state = self._moved(self.optimizer.state(), self.layout, self.saved_layout)
        return {**state, DROPOUT_STEP_KEY: np.array(self._dropout_steps, np.int64)}

    def _moved(self, state: dict, src, dst) -> dict:
        """Optimizer state arrays over the flat LoRA buffer moved between layouts: moments by value, 8-bit codes
        and scales by block (move_flat refuses where blocks straddle tensors). Arrays not sized for `src` stay
        as they are, for Optimizer.load_state to refuse."""
        per_value = [k for k in ("m", "v", "m_codes", "v_codes") if k in state]
        per_block = [k for k in ("m_scale", "v_scale") if k in state]
        block = self.optimizer.config.block_size if per_block else 1
        if any(len(state[k]) != src.total for k in per_value) or \
                any(len(state[k]) != -(-src.total // block) for k in per_block):
            return state
        moved = dict(state)
        for key in per_block + per_value:     # scales first: they refuse an inexact move before anything moved
            moved[key] = move_flat(state[key], src, dst, block if key in per_block else 1)
        return moved

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        dropout_steps = state.pop(DROPOUT_STEP_KEY, None)   # absent in states from the CPU backend
        self.optimizer.load_state(self._moved(state, self.saved_layout, self.layout))
        if dropout_steps is not None:
            self._dropout_steps = int(dropout_steps)

    def memory_bytes(self) -> int:
        return self._bytes

    def f16_products(self) -> list[str]:
        """Labels of the projections (and "lm_head") whose frozen products run in half precision (math f16)."""
        head = ["lm_head"] if self.model.lm_head.math == "f16" else []
        return [f"layers.{i}.{target}" for i, layer in enumerate(self.model.layers)
                for target, linear in layer.proj.items() if linear.math == "f16"] + head

    def close(self) -> None:
        for slot, pending in enumerate(self._pending):
            if pending is not None:
                pending.result()
                self._pending[slot] = None
        if self.scratch is None:
            return
        # The large buffers are freed now; kernels' parameter blocks go with their objects.
        destroy([self.acts, self.scratch, self.weights.embed, self.weights.lm_head, self.weights.final_norm,
                 self.weights.layers])
        self.ctx.bytes_allocated -= self._bytes
        self.model = self.acts = self.scratch = self.weights = self.optimizer = self.grad_norm = None
