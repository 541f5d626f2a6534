"""Bind every kernel of the model to its buffers, once: the per-layer graph that forward and backward encode."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.backends.wgpu.kernels.embedding import Embedding
from engine.backends.wgpu.kernels.linear import Linear
from engine.backends.wgpu.kernels.linear_f16 import LinearF16, f16_math_ok
from engine.backends.wgpu.kernels.lm_head import LmHead
from engine.backends.wgpu.kernels.lora import FusedLoraBranch, LoraBranch, LoraDims, LoraGroup
from engine.backends.wgpu.kernels.residual import ResidualAdd
from engine.backends.wgpu.kernels.rmsnorm import RmsNorm
from engine.backends.wgpu.kernels.swiglu import SwiGlu
from engine.lora.config import LoraConfig, peft_key
from engine.model.hf_names import FUSED_TARGETS, LORA_TARGETS, bias_name
from engine.model.spec import ModelSpec
from engine.backends.wgpu.buffers import FUSED_GROUPS, LayerActivations, LoraLayout, Scratch, lora_groups
from engine.backends.wgpu.weights import ModelWeights


@dataclass
class LayerKernels:
    ln1: RmsNorm | None         # None without pre-norms (OLMo 2), as ln2
    proj: dict                  # target -> Linear (q, k, v, o, gate, up, down)
    lora: dict                  # target -> LoraBranch for the adapted targets not in a group
    rope_q: object              # Rope, or None in a layer without rotary embeddings (SmolLM3)
    rope_k: object
    attention: object
    attn_residual: ResidualAdd
    ln2: RmsNorm | None
    swiglu: SwiGlu
    mlp_residual: ResidualAdd
    dq: object                  # [BT, QD] the gradient buffers RoPE's backward rotates in place
    dk: object                  # [BT, KVD]
    q_norm: RmsNorm | None = None
    k_norm: RmsNorm | None = None
    post_attn_norm: RmsNorm | None = None   # Gemma 3: o_proj output -> the attention residual's branch
    post_mlp_norm: RmsNorm | None = None    # Gemma 3: down_proj output -> the MLP residual's branch
    lora_groups: dict = field(default_factory=dict)   # "qkv" / "gate_up" -> LoraGroup (buffers.lora_groups),
                                                      #   or Phi-3's FusedLoraBranch (buffers.FUSED_GROUPS)


@dataclass
class ModelKernels:
    embedding: Embedding
    layers: list                # [LayerKernels]
    final_norm: RmsNorm
    lm_head: LmHead
    recompute: bool = False     # the layers share one activation set: the backward re-runs each layer's forward


def build_model(ctx, spec: ModelSpec, lora: LoraConfig, B: int, T: int, weights: ModelWeights,
                acts: list, s: Scratch, layout: LoraLayout, chunk: int, dropout_step,
                recompute: bool = False, math: str = "f32") -> ModelKernels:
    """`acts`: one LayerActivations per layer (buffers.allocate_activations); with `recompute` they share all
    but x_out, so each layer's kernels, bound here once, serve its forward, its recompute and its backward.
    `math` "f16": the seven projections' and the LM head's frozen products in half precision where their
    weights allow (LinearF16, LmHead); LoRA products and their gradients stay f32."""
    BT, C = B * T, spec.hidden
    embedding = Embedding(ctx, s.embedded, s.ids, weights.embed, BT, C, weights.vocab_format, scale=spec.embed_scale)
    layers = []
    for layer, (w, a) in enumerate(zip(weights.layers, acts)):
        x_in = s.embedded if layer == 0 else acts[layer - 1].x_out
        layers.append(_build_layer(ctx, spec, lora, B, T, layer, w, a, x_in, s, layout, dropout_step, math))
    final_norm = RmsNorm(ctx, s.ln_f, s.ln_f_rstd, acts[-1].x_out, weights.final_norm, BT, C, spec.rms_eps,
                         dx=s.d_res, dy=s.d_ln, label="final_norm")
    head = LmHead(ctx, s.d_ln, s.row_loss, s.logits, s.stats, s.ln_f, s.targets, s.row_weight, weights.lm_head,
                  BT, C, spec.vocab_size, chunk, partials=s.split_k, fmt=weights.vocab_format, math=math,
                  row_scale=s.row_scale, abs_max=weights.vocab_abs_max,
                  softcap=spec.final_softcap)
    return ModelKernels(embedding, layers, final_norm, head, recompute)


def _build_layer(ctx, spec, lora, B, T, layer, w, a: LayerActivations, x_in, s: Scratch, layout, dropout_step,
                 math: str = "f32"):
    from engine.backends.wgpu.kernels.attention import Attention
    from engine.backends.wgpu.kernels.rope import Rope

    BT, C, eps = B * T, spec.hidden, spec.rms_eps
    name = f"layers.{layer}"
    qk, post, pre = spec.qk_norm, spec.post_norms, spec.pre_norms
    # Each projection: (input, output, d output, d input, whether d input adds to what an earlier one wrote).
    # Backward runs in reverse order, so v, up and down are the first to write their d input. With post-norms
    # o_proj and down_proj write their own saved output (the norm's input) and read the norm's d input.
    # Without pre-norms (OLMo 2) q/k/v read the layer input and gate/up the residual after the attention, and
    # add their d input straight into the residual stream's gradient.
    attn_in, attn_dx = (a.ln1, s.d_ln) if pre else (x_in, s.d_res)
    mlp_in = a.ln2 if pre else a.x_mid
    io = {
        "q_proj": (attn_in, a.q_raw if qk else a.q, s.dq_raw if qk else s.dq, attn_dx, True),
        "k_proj": (attn_in, a.k_raw if qk else a.k, s.dk_raw if qk else s.dk, attn_dx, True),
        "v_proj": (attn_in, a.v, s.dv, attn_dx, not pre),
        "o_proj": (a.att, a.attn_proj if post else s.proj, s.d_post if post else s.d_res, s.d_att, False),
        "gate_proj": (mlp_in, a.gate, s.d_gate, attn_dx, True),
        "up_proj": (mlp_in, a.up, s.d_up, attn_dx, not pre),
        "down_proj": (a.h, a.mlp_proj if post else s.proj, s.d_post if post else s.d_res, s.d_h, False),
    }
    bias = {target: getattr(w, bias_name(target)) for target in spec.bias_targets}
    weight = {"q_proj": w.q, "k_proj": w.k, "v_proj": w.v, "o_proj": w.o, "gate_proj": w.gate, "up_proj": w.up,
              "down_proj": w.down}
    proj, branches, groups = {}, {}, {}
    grouped = {t for targets in lora_groups(lora).values() for t in targets}
    for target in LORA_TARGETS:
        x, y, dy, dx, accumulate = io[target]
        out_f, in_f = spec.projection_shape(target)
        # Granite multiplies the residual branches (o_proj's and down_proj's whole output, LoRA included).
        scale = spec.residual_scale if target in ("o_proj", "down_proj") else 1.0
        held = weight[target]
        f16 = math == "f16" and f16_math_ok(held.format, held.abs_max)
        extra = {"row_scale": s.row_scale} if f16 else {}
        proj[target] = (LinearF16 if f16 else Linear)(
            ctx, y, x, held.buffer, bias.get(target), BT, in_f, out_f, dy=dy, dx=dx, accumulate_dx=accumulate,
            partials=s.split_k, label=f"{name}.{target}", weight_format=held.format, scale=scale, **extra)
        if target in lora.targets and target not in grouped:
            key_a, key_b = peft_key(layer, target, "A"), peft_key(layer, target, "B")
            branches[target] = LoraBranch(
                ctx, LoraDims(BT, in_f, out_f, lora.rank, lora.scaling * scale), y, a.lora_u[target], x,
                layout.binding(s.lora_params, key_a), layout.binding(s.lora_params, key_b), dy=dy, dx=dx,
                grad_a=layout.binding(s.lora_grads, key_a), grad_b=layout.binding(s.lora_grads, key_b), du=s.du,
                dropout=lora.dropout, salt=layer * len(LORA_TARGETS) + LORA_TARGETS.index(target),
                step_uniform=dropout_step, x_drop=s.x_drop, dx_drop=s.dx_drop, partials=s.split_k,
                label=f"{name}.{target}.lora")
    for group, targets in lora_groups(lora).items():
        x, dx = io[targets[0]][0], io[targets[0]][3]
        assert all(io[t][0] is x and io[t][3] is dx for t in targets), f"{group}: members must share x and dx"
        keys_a = [peft_key(layer, t, "A") for t in targets]
        keys_b = [peft_key(layer, t, "B") for t in targets]
        groups[group] = LoraGroup(
            ctx, LoraDims(BT, spec.projection_shape(targets[0])[1], 0, lora.rank, lora.scaling),
            [spec.projection_shape(t)[0] for t in targets], [io[t][1] for t in targets], a.lora_u[group], x,
            layout.stacked_binding(s.lora_params, keys_a), [layout.binding(s.lora_params, k) for k in keys_b],
            dy=[io[t][2] for t in targets], dx=dx, grad_a=layout.stacked_binding(s.lora_grads, keys_a),
            grad_b=[layout.binding(s.lora_grads, k) for k in keys_b], du=s.du, partials=s.split_k,
            label=f"{name}.{group}.lora")
    for fused in (t for t in lora.targets if t in FUSED_TARGETS):
        # Phi-3: one LoRA over the fused projection that its members (computed apart) are.
        members = FUSED_TARGETS[fused]
        x, dx = io[members[0]][0], io[members[0]][3]
        assert all(io[t][0] is x and io[t][3] is dx for t in members), f"{fused}: members must share x and dx"
        out_f, in_f = spec.projection_shape(fused)
        key_a, key_b = peft_key(layer, fused, "A"), peft_key(layer, fused, "B")
        groups[FUSED_GROUPS[fused]] = FusedLoraBranch(
            ctx, LoraDims(BT, in_f, out_f, lora.rank, lora.scaling), [spec.projection_shape(t)[0] for t in members],
            [io[t][1] for t in members], a.lora_u[fused], x, layout.binding(s.lora_params, key_a),
            layout.binding(s.lora_params, key_b), dy=[io[t][2] for t in members], dx=dx,
            grad_a=layout.binding(s.lora_grads, key_a), grad_b=layout.binding(s.lora_grads, key_b), du=s.du,
            dropout=lora.dropout, salt=layer * len(LORA_TARGETS) + LORA_TARGETS.index(members[0]),
            step_uniform=dropout_step, x_drop=s.x_drop, dx_drop=s.dx_drop, partials=s.split_k,
            label=f"{name}.{fused}.lora")
    layer_rope = spec.layer_rope(layer)
    inv_freq, rope_scale = layer_rope.inv_freq(spec.rope_dim, T), layer_rope.attention_factor
    rope = spec.uses_rope(layer)        # SmolLM3's NoPE layers attend without rotating q and k
    kernels = LayerKernels(
        ln1=RmsNorm(ctx, a.ln1, a.ln1_rstd, x_in, w.ln1, BT, C, eps, dx=s.d_res, dy=s.d_ln, accumulate_dx=True,
                    label=f"{name}.ln1") if pre else None,
        proj=proj, lora=branches,
        rope_q=Rope(ctx, a.q, B, T, spec.heads, spec.head_dim, inv_freq, label=f"{name}.rope_q",
                    scale=rope_scale, rotary_dim=spec.rotary_dim) if rope else None,
        rope_k=Rope(ctx, a.k, B, T, spec.kv_heads, spec.head_dim, inv_freq, label=f"{name}.rope_k",
                    scale=rope_scale, rotary_dim=spec.rotary_dim) if rope else None,
        attention=Attention(ctx, B, T, spec.heads, spec.kv_heads, spec.head_dim, a.q, a.k, a.v, a.att, a.lse,
                            s.d_att, s.dq, s.dk, s.dv, dsum=s.att_dsum, dk_heads=s.dk_heads, dv_heads=s.dv_heads,
                            scale=spec.attention_scale, window=spec.layer_window(layer), softcap=spec.attn_softcap),
        attn_residual=ResidualAdd(ctx, a.x_mid, x_in, s.proj, BT * C, label=f"{name}.attn_residual"),
        ln2=RmsNorm(ctx, a.ln2, a.ln2_rstd, a.x_mid, w.ln2, BT, C, eps, dx=s.d_res, dy=s.d_ln, accumulate_dx=True,
                    label=f"{name}.ln2") if pre else None,
        swiglu=SwiGlu(ctx, a.h, a.gate, a.up, BT * spec.intermediate, dgate=s.d_gate, dup=s.d_up, dh=s.d_h,
                      activation=spec.activation, label=f"{name}.swiglu"),
        mlp_residual=ResidualAdd(ctx, a.x_out, a.x_mid, s.proj, BT * C, label=f"{name}.mlp_residual"),
        dq=s.dq, dk=s.dk, lora_groups=groups)
    if qk:
        # Per head (rows BT·heads of HD), or over the whole projection (OLMo 2: rows BT of QD / KVD).
        q_rows, q_dim = (BT, spec.q_dim) if spec.qk_norm_full else (BT * spec.heads, spec.head_dim)
        k_rows, k_dim = (BT, spec.kv_dim) if spec.qk_norm_full else (BT * spec.kv_heads, spec.head_dim)
        kernels.q_norm = RmsNorm(ctx, a.q, a.q_rstd, a.q_raw, w.q_norm, q_rows, q_dim, eps, dx=s.dq_raw,
                                 dy=s.dq, label=f"{name}.q_norm")
        kernels.k_norm = RmsNorm(ctx, a.k, a.k_rstd, a.k_raw, w.k_norm, k_rows, k_dim, eps,
                                 dx=s.dk_raw, dy=s.dk, label=f"{name}.k_norm")
    if post:
        # Forward: the projection's saved output -> s.proj, which the residual add reads. Backward: d_res (the
        # residual stream's gradient is the branch's) -> d_post, written, which the projection reads.
        kernels.post_attn_norm = RmsNorm(ctx, s.proj, a.attn_post_rstd, a.attn_proj, w.post_attn_norm, BT, C, eps,
                                         dx=s.d_post, dy=s.d_res, label=f"{name}.post_attn_norm")
        kernels.post_mlp_norm = RmsNorm(ctx, s.proj, a.mlp_post_rstd, a.mlp_proj, w.post_mlp_norm, BT, C, eps,
                                        dx=s.d_post, dy=s.d_res, label=f"{name}.post_mlp_norm")
    return kernels
