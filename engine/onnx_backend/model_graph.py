"""The decoder (Llama / Mistral / Qwen2 / Qwen3) as ONNX graphs for one (B, T): the training step (forward,
cross-entropy and the backward pass into the LoRA gradients), the evaluation loss, and the logits.

Graph interface (shapes fixed at build time but L; the runner pads smaller batches):
- inputs:  input_ids int64 [B, T]; for train/eval the L positions that have a label: label_rows int64 [L]
  (indices into the B·T flattened positions), targets int64 [L, 1] (their shifted labels) and mask float [L, 1]
  (1, or 0 for the one placeholder row a batch without any label gets); every LoRA tensor under its PEFT name
  (A [r, in], B [out, r]).
- outputs: loss_sum (Σ masked token CE) for train/eval; "grad:<PEFT name>" for train; logits [B, T, V].

The LM head and cross-entropy run on the labelled rows only: a chat corpus trained on the assistant's turns
masks most positions, and the LM head is a fifth of the step's FLOPs at the 135M shape (vocabulary 49152).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.lora import LoraConfig, peft_key
from engine.model_spec import LORA_TARGETS, ModelSpec
from engine.onnx_backend import backward as bw
from engine.onnx_backend import forward as fw
from engine.onnx_backend.graph import Graph

MODES = ("train", "eval", "logits")
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def grad_name(key: str) -> str:
    return f"grad:{key}"


def dropout_mask_name(layer: int, target: str) -> str:
    return f"dropout:{ModelSpec.module_path(layer, target)}"


def prepare_weights(spec: ModelSpec, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Frozen tensors as the graphs use them: q/k/v and gate/up with the RMSNorm weight before them folded in
    (fw.fold_norm_weight); that norm weight is kept too, for LoRA A."""
    def take(name: str) -> np.ndarray:
        if name not in raw:
            raise ValueError(f"{spec.source}: weight {name!r} is missing from the safetensors files")
        return raw[name]

    out = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    out["lm_head"] = out["embed"] if spec.tied_embeddings else take("lm_head.weight")
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        ln1, ln2 = take(f"{p}.input_layernorm.weight"), take(f"{p}.post_attention_layernorm.weight")
        out[f"{i}.ln1"], out[f"{i}.ln2"] = ln1, ln2
        for t in QKV:
            out[f"{i}.{t}"] = fw.fold_norm_weight(take(f"{p}.self_attn.{t}.weight"), ln1)
        if spec.qk_norm:
            out[f"{i}.q_norm"] = take(f"{p}.self_attn.q_norm.weight")
            out[f"{i}.k_norm"] = take(f"{p}.self_attn.k_norm.weight")
        out[f"{i}.o_proj"] = take(f"{p}.self_attn.o_proj.weight")
        for t in GATE_UP:
            out[f"{i}.{t}"] = fw.fold_norm_weight(take(f"{p}.mlp.{t}.weight"), ln2)
        out[f"{i}.down_proj"] = take(f"{p}.mlp.down_proj.weight")
        for t in spec.bias_targets:     # added after the product: folding a norm weight leaves them alone
            out[f"{i}.{t}.bias"] = take(f"{spec.module_path(i, t)}.bias")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


@dataclass(frozen=True)
class GraphShape:
    batch: int
    seq: int

    @property
    def rows(self) -> int:
        return self.batch * self.seq


class DecoderGraph:
    """Emits one graph; `build(mode)` is the llm.c-style layer loop forwards, then backwards."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], lora: LoraConfig, shape: GraphShape,
                 seed: int = 0, expose_dropout_masks: bool = False, attention_blocks: int | None = None):
        """`seed` seeds the LoRA dropout masks; `expose_dropout_masks` adds them as outputs (for tests);
        `attention_blocks` sets the causal query blocks (default fw.query_blocks_for(seq))."""
        self.spec, self.weights, self.lora, self.shape = spec, weights, lora, shape
        self.seed, self.expose_dropout_masks = seed, expose_dropout_masks
        blocks = fw.query_blocks_for(shape.seq) if attention_blocks is None else attention_blocks
        self.att = fw.AttentionShape(shape.batch, shape.seq, spec.heads, spec.kv_heads, spec.head_dim, blocks)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _group(self, g: Graph, layer: int, targets: tuple[str, ...], train: bool,
               input_scale: str | None = None) -> fw.LinearGroup:
        """The projections `targets` of one layer; `input_scale` names the RMSNorm weight folded into them."""
        weights = tuple(g.weight(f"{layer}.{t}", self.weights[f"{layer}.{t}"]) for t in targets)
        biases = tuple(g.weight(f"{layer}.{t}.bias", self.weights[f"{layer}.{t}.bias"])
                       if f"{layer}.{t}.bias" in self.weights else None for t in targets)
        lora = []
        for t in targets:
            if t not in self.lora.targets:
                lora.append(None)
                continue
            out_f, in_f = self.spec.projection_shape(t)
            a, b = peft_key(layer, t, "A"), peft_key(layer, t, "B")
            g.input(a, np.float32, [self.lora.rank, in_f])
            g.input(b, np.float32, [out_f, self.lora.rank])
            lora.append((a, b, grad_name(a), grad_name(b)))
        dropout = self.lora.dropout if train else 0.0     # evaluation and logits never drop out
        lora_targets = [t for t, spec in zip(targets, lora) if spec is not None]
        masks = tuple(dropout_mask_name(layer, t) for t in lora_targets) if self.expose_dropout_masks else ()
        # Registered only where LoRA A reads it: an initializer no node uses is dropped by onnxruntime.
        scale = g.weight(input_scale, self.weights[input_scale]) if input_scale and lora_targets else None
        return fw.LinearGroup(weights=weights, biases=biases, targets=targets, lora=tuple(lora),
                              scaling=self.lora.scaling, rank=self.lora.rank, input_scale=scale,
                              dropout=dropout, dropout_masks=masks,
                              seed=(self.seed * 1009 + layer) * 8 + LORA_TARGETS.index(targets[0]))

    def build(self, mode: str) -> Graph:
        if mode not in MODES:
            raise ValueError(f"graph mode {mode!r} is unknown; choose from {', '.join(MODES)}")
        spec, s, a = self.spec, self.shape, self.att
        g = Graph(f"lora_lab_{mode}")
        train = mode == "train"
        ids = g.input("input_ids", np.int64, [s.batch, s.seq])
        if mode != "logits":
            label_rows = g.input("label_rows", np.int64, ["labelled"])
            targets = g.input("targets", np.int64, ["labelled", 1])
            mask = g.input("mask", np.float32, ["labelled", 1])
        rope = fw.rope_constants(g, spec.rope.inv_freq(spec.head_dim), s.batch, s.seq)
        rope_q = fw.rope_constants(g, spec.rope.inv_freq(spec.head_dim), s.batch, s.seq,
                                   scale=1.0 / np.sqrt(spec.head_dim))      # the attention's 1/sqrt(HD)
        causal = [g.const(fw.causal_mask(a, j), np.float32) for j in range(a.query_blocks)]
        eps = spec.rms_eps

        embed = g.weight("embed", self.weights["embed"])
        x = g.reshape(g.op("Gather", embed, ids, axis=0), [s.rows, spec.hidden])
        guards: list[str] = []

        def heads4(heads: int) -> list[int]:
            return [s.batch, s.seq, heads, spec.head_dim]

        layers, pending = [], None      # pending: the MLP output not yet added to the residual stream x
        for i in range(spec.layers):
            w = lambda name: g.weight(f"{i}.{name}", self.weights[f"{i}.{name}"])  # noqa: E731
            st = {"qkv": self._group(g, i, QKV, train, input_scale=f"{i}.ln1"),
                  "o": self._group(g, i, ("o_proj",), train),
                  "gu": self._group(g, i, GATE_UP, train, input_scale=f"{i}.ln2"),
                  "down": self._group(g, i, ("down_proj",), train)}
            h1, st["n1"], x = fw.fused_rmsnorm_forward(g, x if pending is None else pending, spec.hidden, eps,
                                                       residual=None if pending is None else x, guards=guards)
            (q, k, v), st["l_qkv"] = fw.linear_forward(g, h1, st["qkv"])
            if spec.qk_norm:
                q, st["nq"] = fw.rmsnorm_forward(g, g.reshape(q, heads4(spec.heads)), w("q_norm"), eps)
                k, st["nk"] = fw.rmsnorm_forward(g, g.reshape(k, heads4(spec.kv_heads)), w("k_norm"), eps)
            q = fw.rope_forward(g, g.reshape(q, [s.batch, s.seq, spec.q_dim]), rope_q, spec.heads)
            k = fw.rope_forward(g, g.reshape(k, [s.batch, s.seq, spec.kv_dim]), rope, spec.kv_heads)
            k, v = g.reshape(k, heads4(spec.kv_heads)), g.reshape(v, heads4(spec.kv_heads))
            att, st["att"] = fw.attention_forward(g, q, k, v, causal, a)
            (o,), st["l_o"] = fw.linear_forward(g, att, st["o"])
            h2, st["n2"], x = fw.fused_rmsnorm_forward(g, o, spec.hidden, eps, residual=x, guards=guards)
            (gate, up), st["l_gu"] = fw.linear_forward(g, h2, st["gu"])
            act, st["swiglu"] = fw.swiglu_forward(g, gate, up)
            st["up"] = up
            (pending,), st["l_down"] = fw.linear_forward(g, act, st["down"])
            layers.append(st)

        norm_w = g.weight("norm", self.weights["norm"])
        lm = g.weight("lm_head", self.weights["lm_head"])
        xn, (_, rstd), x = fw.fused_rmsnorm_forward(g, pending, spec.hidden, eps, residual=x, guards=guards)
        if mode == "logits":
            logits = g.op("Gemm", g.op("Mul", xn, norm_w), lm, transB=1, hint="logits")
            g.output(g.reshape(logits, [s.batch, s.seq, spec.vocab_size]), "logits",
                     shape=[s.batch, s.seq, spec.vocab_size])
            return g
        nf = (g.op("Gather", xn, label_rows, axis=0), g.op("Gather", rstd, label_rows, axis=0))   # [L, C], [L, 1]
        logits = g.op("Gemm", g.op("Mul", nf[0], norm_w), lm, transB=1, hint="logits")
        loss_sum, (logp, _) = fw.cross_entropy_forward(g, logits, targets, mask)
        g.output(fw.guard_loss(g, loss_sum, guards), "loss_sum", shape=[])
        if not train:
            return g

        dx = bw.lm_head_cross_entropy_backward(g, logp, lm, g.reshape(targets, [-1]), mask)
        dx = bw.rmsnorm_backward(g, dx, nf, norm_w)                                     # [L, C]
        dx = g.op("ScatterND", g.op("ConstantOfShape", g.const([s.rows, spec.hidden])),
                  g.reshape(label_rows, [-1, 1]), dx)                                   # [B·T, C], 0 unlabelled
        for i in reversed(range(spec.layers)):
            st = layers[i]
            w = lambda name: f"{i}.{name}"  # noqa: E731  (already registered in the forward pass)
            da = bw.linear_backward(g, [dx], st["l_down"], st["down"])
            dgate, dup = bw.swiglu_backward(g, da, st["up"], st["swiglu"])
            dh2 = bw.linear_backward(g, [dgate, dup], st["l_gu"], st["gu"])
            dx = g.op("Add", dx, bw.normalized_rmsnorm_backward(g, dh2, st["n2"]))
            datt = bw.linear_backward(g, [dx], st["l_o"], st["o"])
            dq, dk, dv = bw.attention_backward(g, datt, st["att"], a)
            dq = bw.rope_backward(g, g.reshape(dq, [s.batch, s.seq, spec.q_dim]), rope_q, spec.heads)
            dk = bw.rope_backward(g, g.reshape(dk, [s.batch, s.seq, spec.kv_dim]), rope, spec.kv_heads)
            if spec.qk_norm:
                dq = bw.rmsnorm_backward(g, g.reshape(dq, heads4(spec.heads)), st["nq"], w("q_norm"))
                dk = bw.rmsnorm_backward(g, g.reshape(dk, heads4(spec.kv_heads)), st["nk"], w("k_norm"))
            dys = [g.reshape(dq, [s.rows, spec.q_dim]), g.reshape(dk, [s.rows, spec.kv_dim]),
                   g.reshape(dv, [s.rows, spec.kv_dim])]
            # Nothing below layer 0's attention input is trainable: skip that dx (a full q/k/v-sized GEMM).
            dh1 = bw.linear_backward(g, dys, st["l_qkv"], st["qkv"], need_dx=i > 0)
            if i > 0:
                dx = g.op("Add", dx, bw.normalized_rmsnorm_backward(g, dh1, st["n1"]))
        return g
