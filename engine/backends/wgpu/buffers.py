"""Every buffer of the wgpu training engine: grouped in dataclasses with their shapes, sized by `buffer_shapes`.

The same sizing function allocates the buffers and answers "how many bytes would (model, LoRA, B, T) need?"
(`memory_plan`), so the plan wizard's number is the number the engine allocates.
Notation: BT = B·T rows, C hidden, QD = heads·head_dim, KVD = kv_heads·head_dim, I intermediate, V vocab, r rank.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Mapping

import numpy as np

from engine.backends.wgpu.kernels.linear import SPLIT_PARTIAL_FLOATS, TILES, GemmShape, split_k
from engine.lora.config import LoraConfig, lora_shapes, peft_key
from engine.model.hf_names import EMBED_WEIGHT, FUSED_TARGETS, LM_HEAD_WEIGHT, LORA_TARGETS, layer_tensor
from engine.model.weight_formats import FORMATS, WeightFormat, held_format
from engine.model.spec import ModelSpec
from engine.model.weights import block_tensor_shapes

LORA_ALIGN = 64        # floats: each LoRA tensor starts on a 256-byte boundary so it can be bound as a sub-range
STATS_FLOATS = 16      # stats[0] loss, [1] grad norm, [2] clip scale, [3] skipped, [4] updates, [5] tokens
HISTORY_SLOTS = 8      # finished steps' stats kept on the device until the trainer reads them
STAGE_SLOTS = 4        # micro-batches whose tokens are staged per submit


def nbytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """What GpuContext.buffer allocates for an array of `shape` (rounded up to 16 bytes, at least 16)."""
    return max(16, (int(np.prod(shape)) * itemsize + 15) // 16 * 16)


# Projections whose LoRA branches read one input (q/k/v the attention norm's output, gate/up the MLP norm's):
# kernels.lora.LoraGroup runs their A products as one GEMM each way, over their A tensors stacked [n·r, in].
LORA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
# Phi-3's LoRA on a fused projection (kernels.lora.FusedLoraBranch) runs where its members' group would.
FUSED_GROUPS = {"qkv_proj": "qkv", "gate_up_proj": "gate_up"}


def lora_groups(lora: LoraConfig) -> dict[str, tuple[str, ...]]:
    """The groups that run as one (LORA_GROUPS): every member adapted, and no dropout (each branch would need its
    own mask on the shared input); the other adapted targets run as single branches (kernels.lora.LoraBranch)."""
    if lora.dropout > 0:
        return {}
    return {name: targets for name, targets in LORA_GROUPS.items() if set(targets) <= set(lora.targets)}


@dataclass(frozen=True)
class LoraLayout:
    """Where each LoRA tensor lives in the flat lora_params / lora_grads buffers [P] (offsets in floats).

    Keys iterate in PEFT's order (lora_shapes), but the offsets follow their own order: the A tensors of a group
    (lora_groups) lie back to back, one [n·r, in] matrix that LoraGroup binds whole; every other tensor, and each
    group's first A, starts on a LORA_ALIGN boundary so it can be bound alone."""
    offsets: dict[str, int]               # PEFT key -> first float
    shapes: dict[str, tuple[int, int]]    # PEFT key -> A [r, in] or B [out, r]
    total: int                            # P, a multiple of LORA_ALIGN

    def binding(self, buffer, key: str) -> tuple:
        """(buffer, byte offset, byte size) of one tensor, for a bind group."""
        return buffer, 4 * self.offsets[key], 4 * int(np.prod(self.shapes[key]))

    def stacked_binding(self, buffer, keys: list[str]) -> tuple:
        """(buffer, byte offset, byte size) of tensors that lie back to back (a group's A tensors), as one."""
        at = self.offsets[keys[0]]
        for key in keys:
            if self.offsets[key] != at:
                raise ValueError(f"LoRA tensor {key} is at float {self.offsets[key]}, not right after the one "
                                 f"before it ({at}): these tensors are not stacked in this layout")
            at += int(np.prod(self.shapes[key]))
        return buffer, 4 * self.offsets[keys[0]], 4 * (at - self.offsets[keys[0]])


def lora_layout(spec: ModelSpec, lora: LoraConfig, grouped: bool = True) -> LoraLayout:
    """The engine's layout; `grouped` False: every tensor aligned in PEFT's order, the layout optimizer states are
    saved in (move_flat), as they were before groups, and as the CPU backend's are where no padding is needed."""
    shapes = lora_shapes(spec, lora)
    runs = []          # lists of keys laid back to back, each list starting aligned
    members = {}       # member target -> its group's targets
    for targets in lora_groups(lora).values() if grouped else ():
        members.update({t: targets for t in targets})
    for layer in range(spec.layers):
        for target in lora.targets:
            if target not in members:
                runs.append([peft_key(layer, target, "A")])
            elif target == members[target][0]:
                runs.append([peft_key(layer, t, "A") for t in members[target]])
            runs.append([peft_key(layer, target, "B")])
    placed, at = {}, 0
    for run in runs:
        for key in run:
            placed[key] = at
            at += shapes[key][0] * shapes[key][1]
        at = -(-at // LORA_ALIGN) * LORA_ALIGN
    assert set(placed) == set(shapes), set(placed) ^ set(shapes)
    return LoraLayout({key: placed[key] for key in shapes}, shapes, at)


def move_flat(flat: np.ndarray, src: LoraLayout, dst: LoraLayout, unit: int = 1) -> np.ndarray:
    """A per-parameter array over the flat LoRA buffer (optimizer moments: one value per float; with `unit` > 1
    one per block of `unit` floats, as 8-bit AdamW's scales) moved tensor by tensor from `src`'s offsets to
    `dst`'s, padding zero. Exact only where every tensor starts on a whole unit in both layouts: raises otherwise."""
    if src.offsets == dst.offsets and src.total == dst.total:
        return flat
    uneven = [k for k in src.offsets if src.offsets[k] % unit or dst.offsets[k] % unit]
    if uneven:
        raise ValueError(f"LoRA tensor {uneven[0]} does not start on a whole block of {unit} in both LoRA layouts, "
                         f"so block-quantised optimizer state cannot be moved between them exactly; resume with "
                         f"the same engine version, use a block_size that divides every tensor's size, or adamw")
    out = np.zeros(-(-dst.total // unit), flat.dtype)
    for key, at in src.offsets.items():
        n = -(-int(np.prod(src.shapes[key])) // unit)
        out[dst.offsets[key] // unit:dst.offsets[key] // unit + n] = flat[at // unit:at // unit + n]
    return out


def vocab_pieces(vocab: int, hidden: int, max_binding_bytes: int,
                 fmt: WeightFormat = WeightFormat.F32) -> list[tuple[int, int]]:
    """(first_id, rows) pieces of a [vocab, hidden] table held in `fmt`, each within one storage binding."""
    rows = max_binding_bytes // (4 * FORMATS[fmt].gpu_row_words(hidden))
    if rows < 1:
        raise MemoryError(f"one embedding row of {hidden} weights exceeds the binding limit {max_binding_bytes}")
    return [(v0, min(rows, vocab - v0)) for v0 in range(0, vocab, rows)]


@dataclass(frozen=True)
class FrozenTensor:
    """One frozen weight buffer: its torch shape and the format it is held in on the GPU."""
    shape: tuple[int, ...]
    format: WeightFormat = WeightFormat.F32

    @property
    def nbytes(self) -> int:
        """What GpuContext.buffer allocates for it (the format's GPU layout, rounded up to 16 bytes)."""
        return max(16, (FORMATS[self.format].gpu_nbytes(self.shape) + 15) // 16 * 16)


@dataclass(frozen=True)
class HeldWeight:
    """A frozen matrix on the GPU and the format its buffer holds (engine.model.weight_formats' GPU layout)."""
    buffer: object
    format: WeightFormat
    abs_max: float | None = None   # max |w| of an f16/bf16 weight (whether f16 math may use it); None otherwise


@dataclass
class LayerWeights:
    """One decoder layer's frozen weights, as Hugging Face stores them: matrices as HeldWeight (buffer and
    format), norm weights and biases as f32 buffers."""
    ln1: object                 # [C] input_layernorm (None without pre-norms: OLMo 2)
    q: HeldWeight               # [QD, C]
    k: HeldWeight               # [KVD, C]
    v: HeldWeight               # [KVD, C]
    o: HeldWeight               # [C, QD]
    ln2: object                 # [C] post_attention_layernorm (Gemma: pre_feedforward_layernorm; OLMo 2: None)
    gate: HeldWeight            # [I, C]
    up: HeldWeight              # [I, C]
    down: HeldWeight            # [C, I]
    q_bias: object = None       # [QD]  Qwen2; Llama, Qwen3 attention_bias
    k_bias: object = None       # [KVD]
    v_bias: object = None       # [KVD]
    o_bias: object = None       # [C]   Llama, Qwen3 attention_bias
    gate_bias: object = None    # [I]   Llama mlp_bias
    up_bias: object = None      # [I]
    down_bias: object = None    # [C]
    q_norm: object = None       # [HD]  Qwen3, Gemma 3; [QD] OLMo 2
    k_norm: object = None       # [HD]  Qwen3, Gemma 3; [KVD] OLMo 2
    post_attn_norm: object = None   # [C] Gemma 3: on the attention output (its post_attention_layernorm)
    post_mlp_norm: object = None    # [C] Gemma 3: on the MLP output (post_feedforward_layernorm)


@dataclass
class LayerActivations:
    """What one layer's forward saves for its backward. With recompute, every layer's instance holds the same
    buffers except x_out (allocate_activations)."""
    ln1: object                 # [BT, C] input_layernorm output (None without pre-norms, and ln1_rstd, ln2...)
    ln1_rstd: object            # [BT]
    q: object                   # [BT, QD] after (q_norm and) RoPE
    k: object                   # [BT, KVD] after (k_norm and) RoPE
    v: object                   # [BT, KVD]
    att: object                 # [BT, QD] attention output (o_proj input)
    lse: object                 # [B, NH, T] attention log-sum-exp
    x_mid: object               # [BT, C] residual after attention
    ln2: object                 # [BT, C]
    ln2_rstd: object            # [BT]
    gate: object                # [BT, I]
    up: object                  # [BT, I]
    h: object                   # [BT, I] silu(gate)·up (down_proj input)
    x_out: object               # [BT, C] residual after the MLP = next layer's input
    lora_u: dict                # target -> [BT, r] the LoRA branch's x·Aᵀ (for dB); group -> [BT, n·r]
                                #   (lora_u_shapes)
    q_raw: object = None        # [BT, QD] Qwen3: q_proj output before q_norm
    k_raw: object = None        # [BT, KVD]
    q_rstd: object = None       # [BT·NH] ([BT] for OLMo 2's full-width q/k norms)
    k_rstd: object = None       # [BT·NKV]
    attn_proj: object = None    # [BT, C] Gemma 3: o_proj output, the post-attention norm's input
    attn_post_rstd: object = None   # [BT]
    mlp_proj: object = None     # [BT, C] Gemma 3: down_proj output, the post-MLP norm's input
    mlp_post_rstd: object = None    # [BT]


@dataclass
class Scratch:
    """Buffers the whole model shares: the stream ends, the gradient scratch, tokens and step statistics."""
    embedded: object            # [BT, C] layer 0 input
    proj: object                # [BT, C] o_proj / down_proj output before the residual add
    ln_f: object                # [BT, C] final norm output
    ln_f_rstd: object           # [BT]
    logits: object              # [chunk, V] one chunk of the LM head
    row_loss: object            # [BT] per-row loss · 1/count, summed over micro-batches
    ids: object                 # [BT] int32
    targets: object             # [BT] int32 shifted labels
    row_weight: object          # [BT] gradient weight per row: 1, or a preference objective's −∂L/∂S
    ids_stage: object           # [STAGE_SLOTS, BT] int32 micro-batches of one submit
    targets_stage: object       # [STAGE_SLOTS, BT] int32
    d_res: object               # [BT, C] gradient of the residual stream
    d_ln: object                # [BT, C] gradient of a norm's output
    d_att: object               # [BT, QD]
    dq: object                  # [BT, QD]
    dk: object                  # [BT, KVD]
    dv: object                  # [BT, KVD]
    d_gate: object              # [BT, I]
    d_up: object                # [BT, I]
    d_h: object                 # [BT, I]
    du: object                  # [BT, r] LoRA branch scratch ([BT, n·r] with a group of n: lora_groups)
    split_k: object             # [split_k_floats] partial products of split-K GEMMs
    row_scale: object           # [BT] per-row scales of an f16-math GEMM's A (kernels.linear_f16); allocated
                                #   whatever the math (4 bytes a row) so the memory plan does not depend on it
    stats: object               # [16] see STATS_FLOATS
    history: object             # [HISTORY_SLOTS, 16] stats of finished steps
    lora_params: object         # [P] every LoRA tensor (LoraLayout)
    lora_grads: object          # [P]
    dq_raw: object = None       # [BT, QD] Qwen3
    dk_raw: object = None       # [BT, KVD] Qwen3
    d_post: object = None       # [BT, C] Gemma 3: gradient of a post-norm's input (o_proj / down_proj output)
    x_drop: object = None       # [BT, max in] LoRA dropout
    dx_drop: object = None      # [BT, max in]
    att_dsum: object = None     # [B, NH, T] attention backward's rowsum(dout·out), one for every layer
    dk_heads: object = None     # [BT, QD] GQA: attention backward's per-query-head dk before the group sum
    dv_heads: object = None     # [BT, QD]


# The format a frozen tensor is held in: (HF name, torch shape, whether it is a vocabulary table) -> format.
FormatOf = Callable[[str, tuple, bool], WeightFormat]


def all_f32(_name: str, _shape: tuple, _vocab: bool) -> WeightFormat:
    return WeightFormat.F32


def formats_for(choice: str, stored: Mapping[str, WeightFormat] | None = None) -> FormatOf:
    """The FormatOf of a `--weights` choice (engine.model.weight_formats.held_format); `stored` (HF name -> the
    format the model file holds it in) is what "stored" keeps, and is needed for it."""
    if choice == "stored" and stored is None:
        raise ValueError('weights "stored" needs the model file\'s formats')

    def format_of(name: str, shape: tuple, vocab: bool) -> WeightFormat:
        return held_format(choice, (stored or {}).get(name, WeightFormat.F32), shape, vocab)
    return format_of


def frozen_layout(spec: ModelSpec, max_binding_bytes: int, format_of: FormatOf = all_f32) -> dict[str, FrozenTensor]:
    """Every frozen weight buffer: the embedding (and an untied LM head) in vocabulary pieces that each fit one
    storage binding in their format, the final norm, then per layer (keys as layer_weight_shapes)."""
    C = spec.hidden
    layout = {}
    tables = [("embed", EMBED_WEIGHT)] + ([] if spec.tied_embeddings else [("lm_head", LM_HEAD_WEIGHT)])
    for prefix, hf_name in tables:
        fmt = format_of(hf_name, (spec.vocab_size, C), True)
        layout.update({f"{prefix}.{v0}": FrozenTensor((n, C), fmt)
                       for v0, n in vocab_pieces(spec.vocab_size, C, max_binding_bytes, fmt)})
    for key, shape in layer_weight_shapes(spec).items():
        if key == "final_norm":
            layout[key] = FrozenTensor(shape)
            continue
        _, layer, short = key.split(".")
        tensor = FrozenTensor(shape, format_of(layer_tensor(int(layer), short, spec.post_norms), shape, False))
        if tensor.nbytes > max_binding_bytes:
            raise MemoryError(f"layer {layer} {short} {shape} needs {tensor.nbytes} bytes in {tensor.format.name}, "
                              f"over this adapter's {max_binding_bytes}-byte binding limit; choose a smaller model")
        layout[key] = tensor
    return layout


def layer_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Torch shapes of the final norm and of every layer's frozen tensors, keyed "final_norm" and
    "layers.{i}.{short name}" (engine.model.weights.block_tensor_shapes)."""
    block = block_tensor_shapes(spec)
    shapes = {"final_norm": (spec.hidden,)}
    for layer in range(spec.layers):
        shapes.update({f"layers.{layer}.{name}": shape for name, shape in block.items()})
    return shapes


def layer_activation_shapes(spec: ModelSpec, lora: LoraConfig, B: int, T: int) -> dict:
    BT, C, I = B * T, spec.hidden, spec.intermediate
    shapes = {"ln1": (BT, C), "ln1_rstd": (BT,), "q": (BT, spec.q_dim), "k": (BT, spec.kv_dim),
              "v": (BT, spec.kv_dim), "att": (BT, spec.q_dim), "lse": (B, spec.heads, T), "x_mid": (BT, C),
              "ln2": (BT, C), "ln2_rstd": (BT,), "gate": (BT, I), "up": (BT, I), "h": (BT, I), "x_out": (BT, C),
              "lora_u": lora_u_shapes(lora, BT)}
    if spec.qk_norm:
        full = spec.qk_norm_full
        shapes.update(q_raw=(BT, spec.q_dim), k_raw=(BT, spec.kv_dim), q_rstd=(BT if full else BT * spec.heads,),
                      k_rstd=(BT if full else BT * spec.kv_heads,))
    if not spec.pre_norms:      # OLMo 2: the projections read the residual stream itself
        shapes.update(ln1=None, ln1_rstd=None, ln2=None, ln2_rstd=None)
    if spec.post_norms:
        shapes.update(attn_proj=(BT, C), attn_post_rstd=(BT,), mlp_proj=(BT, C), mlp_post_rstd=(BT,))
    return shapes


def lora_u_shapes(lora: LoraConfig, BT: int) -> dict:
    """u = x·Aᵀ per single branch (by target) and per group (by group name, [BT, n·r]: its members' u side by
    side, in the group's order)."""
    groups = lora_groups(lora)
    grouped = {t for targets in groups.values() for t in targets}
    shapes = {name: (BT, len(targets) * lora.rank) for name, targets in groups.items()}
    shapes.update({t: (BT, lora.rank) for t in lora.targets if t not in grouped})
    return shapes


def allocate_activations(ctx, spec: ModelSpec, lora: LoraConfig, B: int, T: int,
                         recompute: bool) -> list[LayerActivations]:
    """Each layer's LayerActivations. With recompute the layers share one set, which the backward refills by
    running a layer's forward again just before that layer's backward; each layer keeps only its own x_out (the
    residual stream entering the next layer, or the final norm) [BT, C]."""
    shapes = layer_activation_shapes(spec, lora, B, T)
    if not recompute:
        return [allocate(ctx, LayerActivations, shapes, f"layers.{i}") for i in range(spec.layers)]
    shared = allocate(ctx, LayerActivations, {**shapes, "x_out": None}, "layers.recomputed")
    return [replace(shared, x_out=ctx.buffer(nbytes(shapes["x_out"]), f"layers.{i}.x_out"))
            for i in range(spec.layers)]


def activation_bytes(spec: ModelSpec, lora: LoraConfig, B: int, T: int, recompute: bool) -> int:
    """What allocate_activations allocates."""
    shapes = layer_activation_shapes(spec, lora, B, T)
    if not recompute:
        return spec.layers * shapes_bytes(shapes)
    x_out = shapes.pop("x_out")
    return shapes_bytes(shapes) + spec.layers * nbytes(x_out)


def split_k_floats(spec: ModelSpec, lora: LoraConfig, B: int, T: int, chunk: int, vocab_piece_rows: int) -> int:
    """Partial-product floats the largest split-K GEMM of the model needs (capped at SPLIT_PARTIAL_FLOATS)."""
    BT = B * T
    products = []
    for target in LORA_TARGETS:
        out_f, in_f = spec.projection_shape(target)
        products += [GemmShape(BT, out_f, in_f), GemmShape(BT, in_f, out_f)]          # forward, input grad
        if target in lora.targets:
            products += [GemmShape(lora.rank, in_f, BT), GemmShape(out_f, lora.rank, BT)]   # dA, dB
    for targets in lora_groups(lora).values():                                      # a group's stacked dA
        products.append(GemmShape(len(targets) * lora.rank, spec.projection_shape(targets[0])[1], BT))
    for fused in (t for t in lora.targets if t in FUSED_TARGETS):                   # a fused LoRA's dA, dB_i
        products.append(GemmShape(lora.rank, spec.projection_shape(fused)[1], BT))
        products += [GemmShape(spec.projection_shape(m)[0], lora.rank, BT) for m in FUSED_TARGETS[fused]]
    products.append(GemmShape(min(chunk, BT), spec.hidden, vocab_piece_rows))      # LM head d(hidden)
    # The slices of the tile that splits most (the largest: fewest tiles), so a measured tile gets all of them.
    need = [split_k(p, SPLIT_PARTIAL_FLOATS, TILES[0]) * p.M * p.N for p in products
            if split_k(p, SPLIT_PARTIAL_FLOATS) > 1]
    return max(need, default=4)


def scratch_shapes(spec: ModelSpec, lora: LoraConfig, B: int, T: int, chunk: int, vocab_piece_rows: int) -> dict:
    BT, C, I = B * T, spec.hidden, spec.intermediate
    P = lora_layout(spec, lora).total
    shapes = {"embedded": (BT, C), "proj": (BT, C), "ln_f": (BT, C), "ln_f_rstd": (BT,),
              "logits": (chunk, spec.vocab_size), "row_loss": (BT,), "ids": (BT,), "targets": (BT,),
              "row_weight": (BT,),
              "ids_stage": (STAGE_SLOTS, BT), "targets_stage": (STAGE_SLOTS, BT), "d_res": (BT, C), "d_ln": (BT, C),
              "d_att": (BT, spec.q_dim), "dq": (BT, spec.q_dim), "dk": (BT, spec.kv_dim), "dv": (BT, spec.kv_dim),
              "d_gate": (BT, I), "d_up": (BT, I), "d_h": (BT, I),
              "du": (BT, lora.rank * max((len(t) for t in lora_groups(lora).values()), default=1)),
              "split_k": (split_k_floats(spec, lora, B, T, chunk, vocab_piece_rows),), "row_scale": (BT,),
              "stats": (STATS_FLOATS,),
              "history": (HISTORY_SLOTS, STATS_FLOATS), "lora_params": (P,), "lora_grads": (P,)}
    if spec.qk_norm:
        shapes.update(dq_raw=(BT, spec.q_dim), dk_raw=(BT, spec.kv_dim))
    if spec.post_norms:
        shapes["d_post"] = (BT, C)
    shapes["att_dsum"] = (B, spec.heads, T)
    if spec.heads > spec.kv_heads:
        shapes.update(dk_heads=(BT, spec.q_dim), dv_heads=(BT, spec.q_dim))
    if lora.dropout > 0:
        widest = max(spec.projection_shape(t)[1] for t in lora.targets)
        shapes.update(x_drop=(BT, widest), dx_drop=(BT, widest))
    return shapes


def shapes_bytes(shapes: dict) -> int:
    """What allocate allocates for `shapes` (a shape of None: nothing)."""
    return sum(shapes_bytes(s) if isinstance(s, dict) else nbytes(s) for s in shapes.values() if s is not None)


def allocate(ctx, cls, shapes: dict, label: str):
    """An instance of the buffer dataclass `cls` with one zeroed buffer per shape (dicts become dicts; a shape
    of None leaves its field None, for the caller to fill)."""
    names = {f.name for f in fields(cls)}
    assert set(shapes) <= names, set(shapes) - names

    def make(name, shape):
        if shape is None:
            return None
        if isinstance(shape, dict):
            return {k: make(f"{name}.{k}", s) for k, s in shape.items()}
        return ctx.buffer(nbytes(shape), f"{label}.{name}")

    return cls(**{name: make(name, shape) for name, shape in shapes.items()})


def destroy(group) -> None:
    """Free the device memory of every buffer in a buffer dataclass (or list/dict of them) now, not at GC.
    A buffer that appears more than once (recompute's shared activations) is destroyed more than once, which
    WebGPU allows (destroying a destroyed buffer does nothing)."""
    if isinstance(group, (list, tuple)):
        for item in group:
            destroy(item)
    elif isinstance(group, dict):
        destroy(list(group.values()))
    elif hasattr(group, "__dataclass_fields__"):
        destroy([getattr(group, f.name) for f in fields(group)])
    elif hasattr(group, "destroy"):
        group.destroy()
