"""The decoder (Llama / Mistral / Qwen2 / Qwen3) as ONNX graphs for one (B, T): the training step (forward,
cross-entropy and the backward pass into the LoRA gradients), the evaluation loss, and the logits.

Graph interface (all shapes fixed at build time; the runner pads smaller batches):
- inputs:  input_ids int64 [B, T]; targets int64 [B·T, 1] (shifted labels, 0 where masked) and mask float
  [B·T, 1] (train/eval); every LoRA tensor under its PEFT name (A [r, in], B [out, r]).
- outputs: loss_sum (Σ masked token CE) for train/eval; "grad:<PEFT name>" for train; logits [B, T, V].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.lora import LoraConfig, peft_key
from engine.model_spec import ModelSpec
from engine.onnx_backend import backward as bw
from engine.onnx_backend import forward as fw
from engine.onnx_backend.graph import Graph

MODES = ("train", "eval", "logits")
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def grad_name(key: str) -> str:
    return f"grad:{key}"


def prepare_weights(spec: ModelSpec, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Frozen tensors as the graphs use them: q/k/v and gate/up concatenated along the output features."""
    def take(name: str) -> np.ndarray:
        if name not in raw:
            raise ValueError(f"{spec.source}: weight {name!r} is missing from the safetensors files")
        return raw[name]

    out = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    out["lm_head"] = out["embed"] if spec.tied_embeddings else take("lm_head.weight")
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        out[f"{i}.ln1"] = take(f"{p}.input_layernorm.weight")
        out[f"{i}.ln2"] = take(f"{p}.post_attention_layernorm.weight")
        out[f"{i}.qkv"] = np.concatenate([take(f"{p}.self_attn.{t}.weight") for t in QKV], axis=0)
        if spec.qkv_bias:
            out[f"{i}.qkv_bias"] = np.concatenate([take(f"{p}.self_attn.{t}.bias") for t in QKV], axis=0)
        if spec.qk_norm:
            out[f"{i}.q_norm"] = take(f"{p}.self_attn.q_norm.weight")
            out[f"{i}.k_norm"] = take(f"{p}.self_attn.k_norm.weight")
        out[f"{i}.o"] = take(f"{p}.self_attn.o_proj.weight")
        out[f"{i}.gate_up"] = np.concatenate([take(f"{p}.mlp.{t}.weight") for t in GATE_UP], axis=0)
        out[f"{i}.down"] = take(f"{p}.mlp.down_proj.weight")
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

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], lora: LoraConfig, shape: GraphShape):
        if lora.dropout > 0:
            raise ValueError(f"LoRA dropout {lora.dropout} is not supported by the cpu backend yet; use dropout 0")
        self.spec, self.weights, self.lora, self.shape = spec, weights, lora, shape
        self.att = fw.AttentionShape(shape.batch, shape.seq, spec.heads, spec.kv_heads, spec.head_dim)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _group(self, g: Graph, layer: int, name: str, targets: tuple[str, ...], train: bool) -> fw.LinearGroup:
        weight = g.weight(f"{layer}.{name}", self.weights[f"{layer}.{name}"])
        bias = (g.weight(f"{layer}.qkv_bias", self.weights[f"{layer}.qkv_bias"])
                if name == "qkv" and self.spec.qkv_bias else None)
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
        return fw.LinearGroup(weight=weight, bias=bias, targets=targets,
                              outs=tuple(self.spec.projection_shape(t)[0] for t in targets),
                              lora=tuple(lora), scaling=self.lora.scaling, rank=self.lora.rank)

    def build(self, mode: str) -> Graph:
        if mode not in MODES:
            raise ValueError(f"graph mode {mode!r} is unknown; choose from {', '.join(MODES)}")
        spec, s, a = self.spec, self.shape, self.att
        g = Graph(f"lora_lab_{mode}")
        train = mode == "train"
        ids = g.input("input_ids", np.int64, [s.batch, s.seq])
        if mode != "logits":
            targets = g.input("targets", np.int64, [s.rows, 1])
            mask = g.input("mask", np.float32, [s.rows, 1])
        cos_t, sin_t = fw.rope_tables(spec.rope.inv_freq(spec.head_dim), s.seq)
        cos, sin = g.const(cos_t, np.float32), g.const(sin_t, np.float32)
        causal = g.const(fw.causal_mask(a), np.float32)
        eps = spec.rms_eps

        embed = g.weight("embed", self.weights["embed"])
        x = g.reshape(g.op("Gather", embed, ids, axis=0), [s.rows, spec.hidden])
        layers = []
        for i in range(spec.layers):
            w = lambda name: g.weight(f"{i}.{name}", self.weights[f"{i}.{name}"])  # noqa: E731
            st = {"qkv": self._group(g, i, "qkv", QKV, train), "o": self._group(g, i, "o", ("o_proj",), train),
                  "gu": self._group(g, i, "gate_up", GATE_UP, train),
                  "down": self._group(g, i, "down", ("down_proj",), train)}
            h1, st["n1"] = fw.rmsnorm_forward(g, x, w("ln1"), eps)
            (q, k, v), st["l_qkv"] = fw.linear_forward(g, h1, st["qkv"])
            q = g.reshape(q, [s.batch, s.seq, spec.heads, spec.head_dim])
            k = g.reshape(k, [s.batch, s.seq, spec.kv_heads, spec.head_dim])
            v = g.reshape(v, [s.batch, s.seq, spec.kv_heads, spec.head_dim])
            if spec.qk_norm:
                q, st["nq"] = fw.rmsnorm_forward(g, q, w("q_norm"), eps)
                k, st["nk"] = fw.rmsnorm_forward(g, k, w("k_norm"), eps)
            q = fw.rope_forward(g, q, cos, sin, spec.head_dim)
            k = fw.rope_forward(g, k, cos, sin, spec.head_dim)
            att, st["att"] = fw.attention_forward(g, q, k, v, causal, a)
            (o,), st["l_o"] = fw.linear_forward(g, att, st["o"])
            x = g.op("Add", x, o)
            h2, st["n2"] = fw.rmsnorm_forward(g, x, w("ln2"), eps)
            (gate, up), st["l_gu"] = fw.linear_forward(g, h2, st["gu"])
            act, st["sig"] = fw.swiglu_forward(g, gate, up)
            st["gate"], st["up"] = gate, up
            (m,), st["l_down"] = fw.linear_forward(g, act, st["down"])
            x = g.op("Add", x, m)
            layers.append(st)

        norm_w = g.weight("norm", self.weights["norm"])
        lm = g.weight("lm_head", self.weights["lm_head"])
        hf, nf = fw.rmsnorm_forward(g, x, norm_w, eps)
        logits = g.op("Gemm", hf, lm, transB=1, hint="logits")
        if mode == "logits":
            g.output(g.reshape(logits, [s.batch, s.seq, spec.vocab_size]), "logits",
                     shape=[s.batch, s.seq, spec.vocab_size])
            return g
        loss_sum, (logp, _) = fw.cross_entropy_forward(g, logits, targets, mask)
        g.output(loss_sum, "loss_sum", shape=[])
        if not train:
            return g

        dx = bw.lm_head_cross_entropy_backward(g, logp, lm, g.reshape(targets, [s.rows]), mask)
        dx = bw.rmsnorm_backward(g, dx, nf, norm_w)
        for i in reversed(range(spec.layers)):
            st = layers[i]
            w = lambda name: f"{i}.{name}"  # noqa: E731  (already registered in the forward pass)
            (da) = bw.linear_backward(g, [dx], st["l_down"], st["down"])
            dgate, dup = bw.swiglu_backward(g, da, st["gate"], st["up"], st["sig"])
            dh2 = bw.linear_backward(g, [dgate, dup], st["l_gu"], st["gu"])
            dx = g.op("Add", dx, bw.rmsnorm_backward(g, dh2, st["n2"], w("ln2")))
            datt = bw.linear_backward(g, [dx], st["l_o"], st["o"])
            dq, dk, dv = bw.attention_backward(g, datt, st["att"], a)
            dq = bw.rope_backward(g, dq, cos, sin, spec.head_dim)
            dk = bw.rope_backward(g, dk, cos, sin, spec.head_dim)
            if spec.qk_norm:
                dq = bw.rmsnorm_backward(g, dq, st["nq"], w("q_norm"))
                dk = bw.rmsnorm_backward(g, dk, st["nk"], w("k_norm"))
            dqkv = [g.reshape(dq, [s.rows, spec.q_dim]), g.reshape(dk, [s.rows, spec.kv_dim]),
                    g.reshape(dv, [s.rows, spec.kv_dim])]
            # Nothing below layer 0's attention input is trainable: skip that dx (a full q/k/v-sized GEMM).
            dh1 = bw.linear_backward(g, dqkv, st["l_qkv"], st["qkv"], need_dx=i > 0)
            if i > 0:
                dx = g.op("Add", dx, bw.rmsnorm_backward(g, dh1, st["n1"], w("ln1")))
        return g
