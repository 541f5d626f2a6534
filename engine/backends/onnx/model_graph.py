"""The decoder (engine.model.spec.SUPPORTED_MODEL_TYPES) as ONNX graphs for one (B, T): the training step (forward,
cross-entropy and the backward pass into the LoRA gradients), the evaluation loss, and the logits.

Graph interface (shapes fixed at build time but L; the runner pads smaller batches):
- inputs:  input_ids int64 [B, T]; for train/eval the L positions that have a label: label_rows int64 [L]
  (indices into the B·T flattened positions), targets int64 [L, 1] (their shifted labels) and mask float [L, 1]
  (1, or 0 for the one placeholder row a batch without any label gets); every LoRA tensor under its PEFT name
  (A [r, in], B [out, r]).
- outputs: loss_sum (Σ masked token CE) for train/eval; "grad:<PEFT name>" for train; token_logp [L, 1] (each
  labelled row's log-probability of its target) for eval; logits [B, T, V].

The LM head and cross-entropy run on the labelled rows only: a chat corpus trained on the assistant's turns
masks most positions, and the LM head is a fifth of the step's FLOPs at the 135M shape (vocabulary 49152).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.lora.config import LoraConfig, peft_key
from engine.model.hf_names import (EMBED_WEIGHT, FINAL_NORM_WEIGHT, FUSED_TARGETS, LM_HEAD_WEIGHT, LORA_TARGETS,
                                   layer_tensor, module_path)
from engine.model.spec import ModelSpec
from engine.model.weights import WeightSource
from engine.backends.onnx import backward as bw
from engine.backends.onnx import forward as fw
from engine.backends.onnx.graph import Graph

MODES = ("train", "eval", "logits")
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def grad_name(key: str) -> str:
    return f"grad:{key}"


def dropout_mask_name(layer: int, target: str) -> str:
    return f"dropout:{module_path(layer, target)}"


def prepare_weights(spec: ModelSpec, source: WeightSource) -> dict[str, np.ndarray]:
    """Frozen tensors as the graphs use them, in float32, read one at a time from `source` (any stored format is
    widened: the CPU backend computes in f32): q/k/v and gate/up with the RMSNorm weight before them folded in
    (fw.fold_norm_weight); that norm weight is kept too, for LoRA A. Norm weights carry spec.norm_offset
    (Gemma's x·(1+w)), added in f32 as transformers adds it."""
    def take(name: str) -> np.ndarray:
        if name not in source.stored():
            raise ValueError(f"{source.origin}: weight {name!r} is missing")
        return source.f32(name)

    def norm(name: str) -> np.ndarray:
        return take(name) + np.float32(spec.norm_offset)

    def layer_norm(i: int, short: str) -> np.ndarray:
        return norm(layer_tensor(i, short, spec.post_norms))

    # Granite: logits / logits_scale, folded into the final norm (only the LM head reads it).
    out = {"embed": take(EMBED_WEIGHT), "norm": norm(FINAL_NORM_WEIGHT) / np.float32(spec.logits_scale)}
    residual = np.float32(spec.residual_scale)   # Granite: o_proj's and down_proj's outputs times it
    out["lm_head"] = out["embed"] if spec.tied_embeddings else take(LM_HEAD_WEIGHT)
    for i in range(spec.layers):
        if spec.pre_norms:
            ln1, ln2 = layer_norm(i, "ln1"), layer_norm(i, "ln2")
            out[f"{i}.ln1"], out[f"{i}.ln2"] = ln1, ln2
        else:       # OLMo 2: the projections read the residual stream itself; nothing to fold
            ln1 = ln2 = np.ones(spec.hidden, np.float32)
        for t in QKV:
            out[f"{i}.{t}"] = fw.fold_norm_weight(take(f"{module_path(i, t)}.weight"), ln1)
        if spec.qk_norm:
            out[f"{i}.q_norm"] = layer_norm(i, "q_norm")
            out[f"{i}.k_norm"] = layer_norm(i, "k_norm")
        if spec.post_norms:
            out[f"{i}.post_attn_norm"] = layer_norm(i, "post_attn_norm")
            out[f"{i}.post_mlp_norm"] = layer_norm(i, "post_mlp_norm")
        out[f"{i}.o_proj"] = take(f"{module_path(i, 'o_proj')}.weight") * residual
        for t in GATE_UP:
            out[f"{i}.{t}"] = fw.fold_norm_weight(take(f"{module_path(i, t)}.weight"), ln2)
        out[f"{i}.down_proj"] = take(f"{module_path(i, 'down_proj')}.weight") * residual
        for t in spec.bias_targets:     # added after the product: folding a norm weight leaves them alone
            out[f"{i}.{t}.bias"] = take(f"{module_path(i, t)}.bias")
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
        self.att = fw.AttentionShape(shape.batch, shape.seq, spec.heads, spec.kv_heads, spec.head_dim, blocks,
                                     softcap=spec.attn_softcap)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _group(self, g: Graph, layer: int, targets: tuple[str, ...], train: bool,
               input_scale: str | None = None) -> fw.LinearGroup:
        """The projections `targets` of one layer; `input_scale` names the RMSNorm weight folded into them."""
        weights = tuple(g.weight(f"{layer}.{t}", self.weights[f"{layer}.{t}"]) for t in targets)
        biases = tuple(g.weight(f"{layer}.{t}.bias", self.weights[f"{layer}.{t}.bias"])
                       if f"{layer}.{t}.bias" in self.weights else None for t in targets)
        lora = []
        fused_name = next((f for f, members in FUSED_TARGETS.items() if members == targets), None)
        fused = None
        if fused_name in self.lora.targets:     # Phi-3: one LoRA over the members' fused projection
            out_f, in_f = self.spec.projection_shape(fused_name)
            a, b = peft_key(layer, fused_name, "A"), peft_key(layer, fused_name, "B")
            g.input(a, np.float32, [self.lora.rank, in_f])
            g.input(b, np.float32, [out_f, self.lora.rank])
            fused = (a, b, grad_name(a), grad_name(b))
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
        lora_targets = [fused_name] if fused else [t for t, spec in zip(targets, lora) if spec is not None]
        masks = tuple(dropout_mask_name(layer, t) for t in lora_targets) if self.expose_dropout_masks else ()
        # Registered only where LoRA A reads it: an initializer no node uses is dropped by onnxruntime.
        scale = g.weight(input_scale, self.weights[input_scale]) if input_scale and lora_targets else None
        # Granite's residual_scale multiplies o_proj's and down_proj's LoRA output as it does their weights.
        scaling = self.lora.scaling * (self.spec.residual_scale if targets[0] in ("o_proj", "down_proj") else 1.0)
        return fw.LinearGroup(weights=weights, biases=biases, targets=targets, lora=tuple(lora),
                              scaling=scaling, rank=self.lora.rank, input_scale=scale,
                              dropout=dropout, dropout_masks=masks,
                              seed=(self.seed * 1009 + layer) * 8 + LORA_TARGETS.index(targets[0]), fused=fused,
                              outs=tuple(self.spec.projection_shape(t)[0] for t in targets))

    def build(self, mode: str) -> Graph:
        """The llm.c-style step: embed, `layer_forward` per layer, the final norm and `loss`, then
        `layer_backward` per layer in reverse ("logits" stops at the logits, "eval" at the loss)."""
        if mode not in MODES:
            raise ValueError(f"graph mode {mode!r} is unknown; choose from {', '.join(MODES)}")
        spec, s = self.spec, self.shape
        g = Graph(f"lora_lab_{mode}")
        train = mode == "train"
        ids = g.input("input_ids", np.int64, [s.batch, s.seq])
        labelled = None if mode == "logits" else LabelledRows(
            rows=g.input("label_rows", np.int64, ["labelled"]), targets=g.input("targets", np.int64, ["labelled", 1]),
            mask=g.input("mask", np.float32, ["labelled", 1]))
        tables = {}     # RopeSpec -> (keys' tables, queries' tables), shared by the layers with that rope
        partial = spec.rotary_dim or 0      # Phi-3's partial rotary: q is scaled by itself (layer_forward)
        for rope in {spec.layer_rope(i) for i in range(spec.layers) if spec.uses_rope(i)}:
            # factor: yarn's and longrope's cos/sin scale; longrope's frequencies depend on the length
            inv_freq, factor = rope.inv_freq(spec.rope_dim, s.seq), rope.attention_factor
            q_scale = factor if partial else spec.attention_scale * factor
            tables[rope] = (fw.rope_constants(g, inv_freq, s.batch, s.seq, scale=factor, partial_dim=partial),
                            fw.rope_constants(g, inv_freq, s.batch, s.seq, scale=q_scale, partial_dim=partial))
        # A window of T keys or more cuts nothing: those layers share the plain causal masks.
        windows = [w if w is not None and w < s.seq else None for w in map(spec.layer_window, range(spec.layers))]
        masks = {window: [g.const(fw.causal_mask(self.att, j, window), np.float32)
                          for j in range(self.att.query_blocks)] for window in set(windows)}
        consts = StepConstants(     # None in SmolLM3's NoPE layers
            rope=[tables[spec.layer_rope(i)][0] if spec.uses_rope(i) else None for i in range(spec.layers)],
            rope_q=[tables[spec.layer_rope(i)][1] if spec.uses_rope(i) else None for i in range(spec.layers)],
            masks=[masks[window] for window in windows], windows=windows)

        embed = g.weight("embed", self.weights["embed"])
        x = g.reshape(g.op("Gather", embed, ids, axis=0), [s.rows, spec.hidden])
        if spec.embed_scale != 1.0:     # Gemma: the lookup times sqrt(hidden); the tied LM head is not scaled
            x = g.op("Mul", x, g.scalar(spec.embed_scale))
        saved, pending = [], None      # pending: the MLP output not yet added to the residual stream x
        for i in range(spec.layers):
            x, pending, layer = self.layer_forward(g, i, x, pending, consts, train)
            saved.append(layer)
        norm_w = g.weight("norm", self.weights["norm"])
        lm = g.weight("lm_head", self.weights["lm_head"])
        xn, (_, rstd), x = fw.fused_rmsnorm_forward(g, pending, spec.hidden, spec.rms_eps, residual=x,
                                                    guards=consts.guards)
        if labelled is None:
            logits = g.op("Gemm", g.op("Mul", xn, norm_w), lm, transB=1, hint="logits")
            if spec.final_softcap is not None:
                logits, _ = fw.soft_cap(g, logits, spec.final_softcap)
            g.output(g.reshape(logits, [s.batch, s.seq, spec.vocab_size]), "logits",
                     shape=[s.batch, s.seq, spec.vocab_size])
            return g
        dx = self.loss(g, xn, rstd, norm_w, lm, labelled, consts, train)
        if train:
            for i in reversed(range(spec.layers)):
                dx = self.layer_backward(g, i, dx, saved[i], consts)
        return g

    def layer_forward(self, g: Graph, i: int, x: str, pending: str | None, consts: "StepConstants",
                      train: bool) -> tuple[str, str, "LayerSaved"]:
        """Layer i: (residual stream after its attention, its MLP output still to be added, what backward needs).

        The residual add of the previous layer's MLP output (`pending`) is fused into this layer's first norm
        (without pre-norms, OLMo 2, it is a plain add, and the projections read the residual stream)."""
        spec, eps, pre = self.spec, self.spec.rms_eps, self.spec.pre_norms
        w = lambda name: g.weight(f"{i}.{name}", self.weights[f"{i}.{name}"])  # noqa: E731
        saved = LayerSaved(qkv=self._group(g, i, QKV, train, input_scale=f"{i}.ln1" if pre else None),
                           o=self._group(g, i, ("o_proj",), train),
                           gu=self._group(g, i, GATE_UP, train, input_scale=f"{i}.ln2" if pre else None),
                           down=self._group(g, i, ("down_proj",), train))
        if pre:
            h1, saved.n1, x = fw.fused_rmsnorm_forward(g, x if pending is None else pending, spec.hidden, eps,
                                                       residual=None if pending is None else x,
                                                       guards=consts.guards)
        else:
            x = h1 = x if pending is None else g.op("Add", x, pending)
        (q, k, v), saved.l_qkv = fw.linear_forward(g, h1, saved.qkv)
        if spec.qk_norm:    # per head, or (OLMo 2) over the whole projection [B·T, QD]
            q, saved.nq = fw.rmsnorm_forward(g, q if spec.qk_norm_full else g.reshape(q, self._heads4(spec.heads)),
                                             w("q_norm"), eps)
            k, saved.nk = fw.rmsnorm_forward(g, k if spec.qk_norm_full else g.reshape(
                k, self._heads4(spec.kv_heads)), w("k_norm"), eps)
        if consts.rope[i] is None:      # no rotation: the queries take the attention scale by themselves
            q = g.op("Mul", self._rows3(g, q, spec.q_dim), g.scalar(spec.attention_scale))
            k = self._rows3(g, k, spec.kv_dim)
        else:
            q = self._rows3(g, q, spec.q_dim)
            if consts.rope_q[i].partial_dim:    # the unrotated dims need the attention scale too
                q = g.op("Mul", q, g.scalar(spec.attention_scale))
            q = fw.rope_forward(g, q, consts.rope_q[i], spec.heads)
            k = fw.rope_forward(g, self._rows3(g, k, spec.kv_dim), consts.rope[i], spec.kv_heads)
        k, v = g.reshape(k, self._heads4(spec.kv_heads)), g.reshape(v, self._heads4(spec.kv_heads))
        att, saved.att = fw.attention_forward(g, q, k, v, consts.masks[i], self.att, consts.windows[i])
        (o,), saved.l_o = fw.linear_forward(g, att, saved.o)
        if spec.post_norms:     # Gemma: each branch is normed before its residual add
            o, saved.n_post_attn = fw.rmsnorm_forward(g, o, w("post_attn_norm"), eps)
        if pre:
            h2, saved.n2, x = fw.fused_rmsnorm_forward(g, o, spec.hidden, eps, residual=x, guards=consts.guards)
        else:
            x = h2 = g.op("Add", x, o)
        (gate, saved.up), saved.l_gu = fw.linear_forward(g, h2, saved.gu)
        act, saved.swiglu = fw.swiglu_forward(g, gate, saved.up, spec.activation)
        (mlp_out,), saved.l_down = fw.linear_forward(g, act, saved.down)
        if spec.post_norms:
            mlp_out, saved.n_post_mlp = fw.rmsnorm_forward(g, mlp_out, w("post_mlp_norm"), eps)
        return x, mlp_out, saved

    def loss(self, g: Graph, xn: str, rstd: str, norm_w: str, lm: str, labelled: "LabelledRows",
             consts: "StepConstants", train: bool) -> str | None:
        """Cross-entropy over the labelled rows only (output "loss_sum"); in training, the gradient of the final
        norm's input [B·T, C] (zero on unlabelled rows)."""
        s = self.shape
        nf = (g.op("Gather", xn, labelled.rows, axis=0), g.op("Gather", rstd, labelled.rows, axis=0))  # [L, C], [L, 1]
        logits = g.op("Gemm", g.op("Mul", nf[0], norm_w), lm, transB=1, hint="logits")
        cap_tanh = None     # Gemma 2: the loss reads the soft-capped logits
        if self.spec.final_softcap is not None:
            logits, cap_tanh = fw.soft_cap(g, logits, self.spec.final_softcap)
        loss_sum, (logp, logp_picked) = fw.cross_entropy_forward(g, logits, labelled.targets, labelled.mask)
        g.output(fw.guard_loss(g, loss_sum, consts.guards), "loss_sum", shape=[])
        if not train:   # per labelled row log p(target): the preference objectives' sequence sums
            g.output(logp_picked, "token_logp", shape=["labelled", 1])
            return None
        dx = bw.lm_head_cross_entropy_backward(g, logp, lm, g.reshape(labelled.targets, [-1]), labelled.mask,
                                               cap_tanh=cap_tanh, targets=labelled.targets)
        dx = bw.rmsnorm_backward(g, dx, nf, norm_w)                                     # [L, C]
        return g.op("ScatterND", g.op("ConstantOfShape", g.const([s.rows, self.spec.hidden])),
                    g.reshape(labelled.rows, [-1, 1]), dx)                              # [B·T, C]

    def layer_backward(self, g: Graph, i: int, dx: str, saved: "LayerSaved", consts: "StepConstants") -> str:
        """Layer i in reverse: the LoRA gradients of its projections, and the residual stream's gradient below it."""
        spec = self.spec
        d_mlp = dx if saved.n_post_mlp is None else bw.rmsnorm_backward(g, dx, saved.n_post_mlp, f"{i}.post_mlp_norm")
        da = bw.linear_backward(g, [d_mlp], saved.l_down, saved.down)
        dgate, dup = bw.swiglu_backward(g, da, saved.up, saved.swiglu)
        dh2 = bw.linear_backward(g, [dgate, dup], saved.l_gu, saved.gu)
        dx = g.op("Add", dx, bw.normalized_rmsnorm_backward(g, dh2, saved.n2) if saved.n2 else dh2)
        d_o = dx if saved.n_post_attn is None else bw.rmsnorm_backward(g, dx, saved.n_post_attn,
                                                                       f"{i}.post_attn_norm")
        datt = bw.linear_backward(g, [d_o], saved.l_o, saved.o)
        dq, dk, dv = bw.attention_backward(g, datt, saved.att, self.att)
        if consts.rope[i] is None:
            dq = g.op("Mul", self._rows3(g, dq, spec.q_dim), g.scalar(spec.attention_scale))
            dk = self._rows3(g, dk, spec.kv_dim)
        else:
            dq = bw.rope_backward(g, self._rows3(g, dq, spec.q_dim), consts.rope_q[i], spec.heads)
            if consts.rope_q[i].partial_dim:
                dq = g.op("Mul", dq, g.scalar(spec.attention_scale))
            dk = bw.rope_backward(g, self._rows3(g, dk, spec.kv_dim), consts.rope[i], spec.kv_heads)
        if spec.qk_norm:   # the norm weights were registered by the forward pass
            rows = self.shape.rows
            q_shape = [rows, spec.q_dim] if spec.qk_norm_full else self._heads4(spec.heads)
            k_shape = [rows, spec.kv_dim] if spec.qk_norm_full else self._heads4(spec.kv_heads)
            dq = bw.rmsnorm_backward(g, g.reshape(dq, q_shape), saved.nq, f"{i}.q_norm")
            dk = bw.rmsnorm_backward(g, g.reshape(dk, k_shape), saved.nk, f"{i}.k_norm")
        rows = self.shape.rows
        dys = [g.reshape(dq, [rows, spec.q_dim]), g.reshape(dk, [rows, spec.kv_dim]),
               g.reshape(dv, [rows, spec.kv_dim])]
        # Nothing below layer 0's attention input is trainable: skip that dx (a full q/k/v-sized GEMM).
        dh1 = bw.linear_backward(g, dys, saved.l_qkv, saved.qkv, need_dx=i > 0)
        if i == 0:
            return dx
        return g.op("Add", dx, bw.normalized_rmsnorm_backward(g, dh1, saved.n1) if saved.n1 else dh1)

    def _heads4(self, heads: int) -> list[int]:
        return [self.shape.batch, self.shape.seq, heads, self.spec.head_dim]

    def _rows3(self, g: Graph, x: str, width: int) -> str:
        return g.reshape(x, [self.shape.batch, self.shape.seq, width])


@dataclass(frozen=True)
class LabelledRows:
    """The loss inputs: which of the B·T positions carry a label, their next-token targets and weights."""
    rows: str           # int64 [L] indices into the B·T flattened positions
    targets: str        # int64 [L, 1]
    mask: str           # float [L, 1] 1 per real label (0 for the placeholder of an unlabelled batch)


@dataclass
class StepConstants:
    """Tensors every layer of one graph shares."""
    rope: list[fw.Rope | None]          # per layer: rotation tables for the keys (ModelSpec.layer_rope; None: NoPE)
    rope_q: list[fw.Rope | None]        # the same with the attention's scale folded in, for the queries
    masks: list[list[str]]              # per layer: its additive causal (or sliding-window) mask per query block
    windows: list[int | None]           # per layer: its sliding window (None: none, or as long as the sequence)
    guards: list[str] = field(default_factory=list)   # non-finite checks the loss is guarded by


@dataclass
class LayerSaved:
    """What one layer's forward leaves for its backward: its projection groups and each op's saved tensors."""
    qkv: fw.LinearGroup
    o: fw.LinearGroup
    gu: fw.LinearGroup
    down: fw.LinearGroup
    n1: tuple[str, str] | None = None           # input norm: (normalised input, rstd)
    l_qkv: fw.LinearSaved | None = None         # q/k/v projections
    nq: tuple[str, str] | None = None           # Qwen3 q_norm / k_norm
    nk: tuple[str, str] | None = None
    att: fw.AttentionSaved | None = None
    l_o: fw.LinearSaved | None = None
    n2: tuple[str, str] | None = None           # post-attention norm
    l_gu: fw.LinearSaved | None = None
    up: str | None = None                       # up_proj output (SwiGLU's backward needs it)
    swiglu: tuple[str, ...] | None = None
    l_down: fw.LinearSaved | None = None
    n_post_attn: tuple[str, str] | None = None  # Gemma's norms on the attention and MLP outputs
    n_post_mlp: tuple[str, str] | None = None
