"""`OnnxBackend`: the TrainingBackend that runs the LoRA training step as an ONNX graph on onnxruntime (CPU
execution provider, or another one where installed), with the host optimizers of engine.backends.optimizers."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from engine.backends.base import (IGNORE_LABEL, OptimizerConfig, PendingStep, PreferenceStepResult, StepResult,
                                  TrainingBackend, check_batch, counted_tokens, shift_labels)
from engine.backends.preference import (PreferenceLoss, PreferenceObjective, join_pairs, preference_loss,
                                        split_pairs)
from engine.lora.config import LoraConfig, fit_targets, init_lora_state
from engine.model.spec import load_model_spec
from engine.model.weights import open_weights
from engine.backends.onnx.model_graph import DecoderGraph, GraphShape, grad_name, prepare_weights
from engine.backends.hardware import cpu_threads
from engine.backends.onnx.session import Binding, GraphSession, available_providers, ort_values
from engine.backends.optimizers import clip_scale, global_grad_norm, make_host_optimizer


def flat_views(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One contiguous float32 vector holding copies of `arrays` back to back, and views of it by name."""
    flat = np.empty(sum(a.size for a in arrays.values()), np.float32)
    views, offset = {}, 0
    for name, array in arrays.items():
        views[name] = flat[offset:offset + array.size].reshape(array.shape)
        views[name][...] = array
        offset += array.size
    return flat, views


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class OnnxBackend(TrainingBackend):
    """One model + LoRA + optimizer in onnxruntime, sized for (batch_size, seq_len); smaller batches are padded."""

    def __init__(self, model_dir: str | Path, lora: LoraConfig, optim: OptimizerConfig, batch_size: int,
                 seq_len: int, seed: int = 0, init_state: dict[str, np.ndarray] | None = None,
                 threads: int | None = None, providers: tuple[str, ...] | None = None,
                 profile_prefix: str | None = None, attention_blocks: int | None = None):
        """`profile_prefix` records onnxruntime's per-node profile of the training graph (bench/cpu_profile.py);
        `attention_blocks` overrides the causal query blocks (forward.query_blocks_for picks them by length)."""
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        self._rss_before = _rss_bytes()
        self.spec = load_model_spec(model_dir)
        if seq_len > self.spec.max_positions:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                             f"{self.spec.max_positions}")
        lora = fit_targets(self.spec, lora)     # the default targets name Phi-3's fused projections
        self.lora, self.optim = lora, optim
        self.batch_size, self.seq_len = batch_size, seq_len
        self.threads = threads or cpu_threads()
        self._profile_prefix = profile_prefix
        self.providers = available_providers(providers)
        self.name = f"cpu: onnxruntime ({self.providers[0].removesuffix('ExecutionProvider')}, " \
                    f"{self.threads} threads)"
        self._weights = prepare_weights(self.spec, open_weights(model_dir))
        self._values = ort_values(self._weights)
        self._graphs = DecoderGraph(self.spec, self._weights, lora, GraphShape(batch_size, seq_len), seed=seed,
                                    attention_blocks=attention_blocks)
        self._sessions: dict[str, GraphSession] = {}
        self._bindings: dict[str, Binding] = {}
        # LoRA tensors and their gradients live in one flat vector each (the optimizer updates the whole vector
        # in place, no concatenation); the sessions read and write the per-tensor views by address.
        self._flat_params, self._state = flat_views(init_lora_state(self.spec, lora, seed))
        self._flat_grads, self._grads = flat_views(self._state)
        self._flat_extra: np.ndarray | None = None      # the second and later micro-batches' gradients
        self._flat_previous = self._flat_params.copy()  # before the last applied update (lora_state_before_update)
        self._adapter_off: dict[str, np.ndarray] | None = None   # zero LoRA B tensors: the DPO reference
        if init_state is not None:
            self.load_lora_state(init_state)
        # Sized up front, so that optimizer_state() already works for a checkpoint taken before any step.
        self._optimizer = make_host_optimizer(optim, self._flat_params.size, threads=self.threads)
        self._ids = np.zeros((batch_size, seq_len), np.int64)       # the batch, padded, bound by address
        self._labelled: dict[str, np.ndarray] = {}                  # label_rows, targets, mask: see _fill
        self._loss_sum = np.zeros((), np.float32)
        self._session("train")
        self._held_bytes = max(0, _rss_bytes() - self._rss_before)

    # ---- sessions ---------------------------------------------------------------------------------------
    def _session(self, mode: str) -> GraphSession:
        if mode not in self._sessions:
            self._sessions[mode] = GraphSession(self._graphs.build(mode), self._values, self.threads,
                                                self.providers, prepack=mode == "train",
                                                profile_prefix=self._profile_prefix if mode == "train" else None)
        return self._sessions[mode]

    def _fill(self, input_ids: np.ndarray, labels: np.ndarray | None) -> None:
        """Write the batch into the bound arrays, padded to the built shape: padded positions and rows have
        mask 0 (causal attention keeps the real positions unaffected by padding after them)."""
        b, t = input_ids.shape
        self._ids[...] = 0
        self._ids[:b, :t] = input_ids
        if labels is not None:
            shifted = np.full((self.batch_size, self.seq_len), IGNORE_LABEL, np.int64)
            shifted[:b, :t] = shift_labels(labels)
            if (shifted >= self.spec.vocab_size).any():
                raise ValueError(f"label out of range 0..{self.spec.vocab_size - 1}: {int(labels.max())}")
            rows = np.flatnonzero(shifted != IGNORE_LABEL)
            mask = np.ones((rows.size, 1), np.float32)
            if rows.size == 0:          # one placeholder row of weight 0: loss 0, gradients 0
                rows, mask = np.zeros(1, np.int64), np.zeros((1, 1), np.float32)
            self._labelled = {"label_rows": rows.astype(np.int64),
                              "targets": np.maximum(shifted.reshape(-1)[rows], 0).reshape(-1, 1), "mask": mask}

    def _feeds(self, labelled: bool) -> dict[str, np.ndarray]:
        feeds = {"input_ids": self._ids, **self._state}
        if labelled:
            feeds.update(self._labelled)
        return feeds

    def _train_binding(self, grads: dict[str, np.ndarray], key: str) -> Binding:
        """The train session bound to the batch arrays, the LoRA views and `grads` (views of one flat vector) as
        outputs; all but the labelled rows (their number changes from batch to batch) are bound once."""
        if key not in self._bindings:
            binding = self._session("train").binding()
            binding.inputs(self._feeds(labelled=False))
            binding.outputs({"loss_sum": self._loss_sum, **{grad_name(n): g for n, g in grads.items()}})
            self._bindings[key] = binding
        self._bindings[key].inputs(self._labelled)
        return self._bindings[key]

    def _check(self, input_ids, labels=None):
        input_ids = np.asarray(input_ids)
        check_batch(input_ids, input_ids if labels is None else np.asarray(labels), self.batch_size,
                    self.seq_len, self.spec.vocab_size)

    # ---- the contract -----------------------------------------------------------------------------------
    def _accumulate(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                    mean: bool = True) -> tuple[float, int]:
        """Run the micro-batches; self._grads then holds the LoRA gradients of the mean token CE (of the summed
        CE with mean=False: train_step folds the 1/tokens into the optimizer's gradient scale, one pass less)."""
        if not micro_batches:
            raise ValueError("a step needs at least one (input_ids, labels) micro-batch")
        loss_sum, tokens = 0.0, 0
        for index, (input_ids, labels) in enumerate(micro_batches):
            self._check(input_ids, labels)
            self._fill(np.asarray(input_ids), np.asarray(labels))
            self._backward_into_grads(index)
            loss_sum += float(self._loss_sum)
            tokens += counted_tokens(labels)
        self._held_bytes = max(self._held_bytes, _rss_bytes() - self._rss_before)
        if tokens == 0:
            return float("nan"), 0
        if mean:
            self._flat_grads *= np.float32(1.0 / tokens)
        return loss_sum / tokens, tokens

    def gradients(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[float, int, dict[str, np.ndarray]]:
        """(mean token CE, counted tokens, LoRA gradients of that mean) over the micro-batches; no update."""
        loss, tokens = self._accumulate(micro_batches)
        return loss, tokens, {n: g.copy() for n, g in self._grads.items()}

    def _backward_into_grads(self, index: int) -> None:
        """The training graph on the filled micro-batch `index` of a step: the first writes the gradients, later
        ones add theirs (a second bound output, summed on the host)."""
        if index == 0:
            self._train_binding(self._grads, "first").run()
            return
        if self._flat_extra is None:
            self._flat_extra, self._extra = flat_views(self._grads)
        self._train_binding(self._extra, "extra").run()
        self._flat_grads += self._flat_extra

    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], lr: float,
                   max_grad_norm: float) -> PendingStep:
        loss, tokens = self._accumulate(micro_batches, mean=False)      # gradients of the summed CE
        # A NaN loss from the overflow guard (fw.guard_loss) leaves the gradients finite but meaningless: the
        # norm is reported as NaN too, as it is where the NaN runs through the whole graph.
        norm = global_grad_norm(self._grads.values()) / tokens if np.isfinite(loss) else float("nan")
        if not (np.isfinite(loss) and np.isfinite(norm)):
            return PendingStep.done(StepResult(self._optimizer.step_count, loss, tokens, norm, True))
        np.copyto(self._flat_previous, self._flat_params)
        self._optimizer.step_flat(self._flat_params, self._flat_grads, lr,
                                  grad_scale=clip_scale(norm, max_grad_norm) / tokens)
        return PendingStep.done(StepResult(self._optimizer.step_count, loss, tokens, norm, False))

    # ---- preference objectives ---------------------------------------------------------------------------
    def sequence_logps(self, input_ids: np.ndarray, labels: np.ndarray, adapter: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The eval graph's per-target log-probabilities summed per row. The adapter is switched off by feeding
        zero LoRA B tensors (the LoRA branch then adds exactly 0): the reference costs a forward pass, no weights."""
        self._check(input_ids, labels)
        input_ids, labels = np.asarray(input_ids), np.asarray(labels)
        self._fill(input_ids, labels)
        if not adapter and self._adapter_off is None:
            self._adapter_off = {k: np.zeros_like(v) for k, v in self._state.items() if ".lora_B." in k}
        lora = self._state if adapter else {**self._state, **self._adapter_off}
        out = self._session("eval").run({"input_ids": self._ids, **lora, **self._labelled}, ["loss_sum", "token_logp"])
        rows, weight = self._labelled["label_rows"] // self.seq_len, self._labelled["mask"][:, 0].astype(np.float64)
        logps = np.bincount(rows, weights=out["token_logp"][:, 0].astype(np.float64) * weight,
                            minlength=self.batch_size)
        counts = np.bincount(rows, weights=weight, minlength=self.batch_size).astype(np.int64)
        if not np.isfinite(float(out["loss_sum"])):     # the overflow guard (fw.guard_loss) fired
            logps[:] = np.nan
        b = input_ids.shape[0]
        return logps[:b], counts[:b]

    def _preference_accumulate(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                               objective: PreferenceObjective, reference: Sequence[np.ndarray] | None = None
                               ) -> tuple[PreferenceLoss, int, bool]:
        """Forward passes for every row's S (and the reference's, DPO), the loss and ∂L/∂S on the host
        (engine.backends.preference), then the training graph with each labelled row weighted by −∂L/∂S of
        its row: the gradient of Σ w·CE is then exactly dL/dθ, left in self._grads. Returns (loss and metrics,
        completion tokens, whether everything stayed finite)."""
        if not micro_batches:
            raise ValueError("a step needs at least one (input_ids, labels) micro-batch")
        if self.lora.dropout > 0:
            raise ValueError(f"lora dropout {self.lora.dropout} with a preference objective: the CPU backend "
                             "measures log-probabilities and gradients in separate passes, which would see different "
                             "dropout masks; set lora dropout to 0 for DPO/ORPO")
        measured = [self.sequence_logps(ids, labels) for ids, labels in micro_batches]
        if not objective.needs_reference:
            reference = None
        elif reference is None:
            reference = join_pairs([self.sequence_logps(ids, labels, adapter=False)[0]
                                    for ids, labels in micro_batches])
        else:
            reference = join_pairs(list(reference))
        counts = join_pairs([c for _, c in measured])
        result = preference_loss(objective, join_pairs([s for s, _ in measured]), counts, reference)
        tokens = int(counts.sum())
        d_rows = split_pairs(result.d_logps, [len(c) for _, c in measured])
        finite = np.isfinite(result.loss)
        for index, ((input_ids, labels), d) in enumerate(zip(micro_batches, d_rows)):
            self._fill(np.asarray(input_ids), np.asarray(labels))
            rows = self._labelled["label_rows"] // self.seq_len
            padded = np.zeros(self.batch_size, np.float64)
            padded[:len(d)] = d
            self._labelled["mask"] = (-padded[rows, None] * self._labelled["mask"]).astype(np.float32)
            self._backward_into_grads(index)
            finite = finite and np.isfinite(float(self._loss_sum))
        self._held_bytes = max(self._held_bytes, _rss_bytes() - self._rss_before)
        return result, tokens, bool(finite)

    def preference_gradients(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                             objective: PreferenceObjective) -> tuple[PreferenceLoss, int, dict[str, np.ndarray]]:
        """(loss and metrics, completion tokens, LoRA gradients of the loss); no update."""
        result, tokens, _ = self._preference_accumulate(micro_batches, objective)
        return result, tokens, {n: g.copy() for n, g in self._grads.items()}

    def preference_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                        objective: PreferenceObjective, lr: float, max_grad_norm: float,
                        reference: Sequence[np.ndarray] | None = None) -> PendingStep:
        result, tokens, finite = self._preference_accumulate(micro_batches, objective, reference)
        norm = global_grad_norm(self._grads.values()) if finite else float("nan")
        skipped = not (finite and np.isfinite(norm))
        if not skipped:
            np.copyto(self._flat_previous, self._flat_params)
            self._optimizer.step_flat(self._flat_params, self._flat_grads, lr,
                                      grad_scale=clip_scale(norm, max_grad_norm))
        return PendingStep.done(PreferenceStepResult(
            self._optimizer.step_count, result.loss, tokens, norm, skipped, result.pairs, result.reward_margin,
            result.reward_accuracy, result.chosen_reward, result.rejected_reward))

    def eval_loss(self, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        self._check(input_ids, labels)
        self._fill(np.asarray(input_ids), np.asarray(labels))
        out = self._session("eval").run(self._feeds(labelled=True), ["loss_sum"])
        return float(out["loss_sum"]), counted_tokens(labels)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        self._check(input_ids)
        b, t = np.asarray(input_ids).shape
        self._fill(np.asarray(input_ids), None)
        out = self._session("logits").run(self._feeds(labelled=False), ["logits"])
        return np.ascontiguousarray(out["logits"][:b, :t])

    def lora_state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._state.items()}

    def load_lora_state(self, state: dict[str, np.ndarray]) -> None:
        missing, extra = self._state.keys() - state.keys(), state.keys() - self._state.keys()
        if missing or extra:
            raise ValueError(f"LoRA state does not match this model/config: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        for key, value in state.items():
            value = np.asarray(value)
            if value.shape != self._state[key].shape:
                raise ValueError(f"LoRA tensor {key} has shape {list(value.shape)}; expected "
                                 f"{list(self._state[key].shape)}")
        # Copy into the existing arrays: the optimizer updates them in place.
        for key, value in state.items():
            self._state[key][...] = np.asarray(value, np.float32)
        np.copyto(self._flat_previous, self._flat_params)

    def lora_state_before_update(self) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        for key, view in self._state.items():      # the order flat_views laid them out in
            out[key] = self._flat_previous[offset:offset + view.size].reshape(view.shape).copy()
            offset += view.size
        return out

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self._optimizer.state()

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        # The WGSL backend saves its dropout-mask counter beside the optimizer; it means nothing here.
        self._optimizer.load_state({k: v for k, v in state.items() if k != "lora_dropout_step"})

    def memory_bytes(self) -> int:
        """Growth of this process's resident memory since construction began, largest seen after a training
        step: weights, packed weights, sessions, activation arenas, LoRA and optimizer state (measured)."""
        return int(max(self._held_bytes, _rss_bytes() - self._rss_before))

    def end_profiling(self) -> str:
        """The training graph's profile so far (a JSON trace path); needs profile_prefix at construction."""
        if self._profile_prefix is None:
            raise RuntimeError("this backend was built without profile_prefix")
        return self._session("train").end_profiling()

    def close(self) -> None:
        self._bindings.clear()
        self._sessions.clear()
        self._values = {}
        self._weights = {}
