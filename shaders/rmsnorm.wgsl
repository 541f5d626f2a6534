// RMSNorm over the last axis: out = w ⊙ x · rstd, rstd = 1/sqrt(mean(x²) + eps), one workgroup per row.
// A row whose mean square is not finite gets NaN outputs and rstd (see rmsnorm_forward).
// Used for the block norms ([B·T, C]) and, per head, for Qwen3's q_norm/k_norm ([B·T·heads, head_dim]).
// Backward (input gradient only; the norm weights are frozen):
//   dx = rstd · (w ⊙ dy) − x · rstd³ / n · Σ(w ⊙ dy ⊙ x),  written or, with `accumulate`, added to dx
// (the residual stream's gradient collects both branches).
struct Params { rows: u32, dim: u32, groups_x: u32, accumulate: u32, eps: f32, _pad0: f32, _pad1: f32, _pad2: f32 }

#include "prelude.wgsl"

const WG: u32 = 128u;
@group(0) @binding(0) var<storage, read_write> out: array<f32>;   // forward: y [rows, dim]; backward: dx
@group(0) @binding(1) var<storage, read_write> rstd: array<f32>;  // [rows] saved by forward, read by backward
@group(0) @binding(2) var<storage, read> x: array<f32>;           // [rows, dim] the norm's input
@group(0) @binding(3) var<storage, read> w: array<f32>;           // [dim]
@group(0) @binding(4) var<storage, read> dy: array<f32>;          // [rows, dim] backward only
@group(0) @binding(5) var<uniform> params: Params;

@compute @workgroup_size(128)
fn rmsnorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.y * params.groups_x + wg.x;
    if (row >= params.rows) { return; }   // uniform per workgroup, so the barriers below stay uniform
    let base = row * params.dim;
    var ss = 0.0;
    for (var i = lid; i < params.dim; i += WG) { let v = x[base + i]; ss += v * v; }
    let ms = workgroup_sum(ss, lid) / f32(params.dim);
    // A row whose mean square overflowed (inf) or is NaN would give inverseSqrt(inf) = 0: every later layer
    // would see zeros and the loss would settle, finite, at ln(vocab), hiding the divergence from the
    // non-finite guard. Propagate it as NaN instead, so the step's loss is NaN and the step is skipped.
    let r = select(inverseSqrt(ms + params.eps), bitcast<f32>(0x7fc00000u), !is_finite(ms));
    for (var i = lid; i < params.dim; i += WG) { out[base + i] = w[i] * (x[base + i] * r); }
    if (lid == 0u) { rstd[row] = r; }
}

@compute @workgroup_size(128)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.y * params.groups_x + wg.x;
    if (row >= params.rows) { return; }
    let base = row * params.dim;
    let r = rstd[row];
    var dot = 0.0;
    for (var i = lid; i < params.dim; i += WG) { dot += w[i] * dy[base + i] * x[base + i]; }
    let c = workgroup_sum(dot, lid) * r * r * r / f32(params.dim);
    for (var i = lid; i < params.dim; i += WG) {
        var g = r * w[i] * dy[base + i] - c * x[base + i];
        if (params.accumulate != 0u) { g += out[base + i]; }
        out[base + i] = g;
    }
}
