// Global gradient norm, clipping, non-finite guard and the optimizer update over ONE flat parameter buffer.
//   params, grads: [P] f32     stats: [16] f32 (0 loss, 1 grad norm, 2 clip scale, 3 skipped, 4 step count)
// Order in a step: grad_norm_partial -> grad_norm_final -> optimizer_prepare -> <optimizer>_update.
// The update kernels always zero the gradients for the next step, even when the step is skipped.
// An applied update first copies params into `previous`: the adapter whose forward and backward this step found
// finite, which the trainer keeps when the updated weights then overflow (a huge learning rate).
struct Hyper {
    lr: f32,
    max_norm: f32,       // 0 = no clipping
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,   // decoupled: p *= 1 - lr * wd (torch.optim.AdamW)
    n: u32,              // P
    row_stride: u32,     // elementwise kernels: invocations per dispatch row
    block_size: u32,     // adamw8bit: values per quantisation block (multiple of 4)
    n_partials: u32,     // grad norm: workgroups of the first pass
    n_blocks: u32,       // adamw8bit: ceil(P / block_size)
    blocks_per_row: u32, // adamw8bit: workgroups per dispatch row
    _pad0: u32, _pad1: u32, _pad2: u32, _pad3: u32,
}

#include "prelude.wgsl"

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> hyper: Hyper;
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;
@group(0) @binding(2) var<storage, read_write> grads: array<f32>;
@group(0) @binding(3) var<storage, read_write> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;  // [n_partials] sums of squares
@group(0) @binding(5) var<storage, read_write> m32: array<f32>;       // AdamW first moment [P]
@group(0) @binding(6) var<storage, read_write> v32: array<f32>;       // AdamW second moment [P]
@group(0) @binding(7) var<storage, read_write> m8: array<u32>;        // 8-bit codes, 4 per word [ceil(P/4)]
@group(0) @binding(8) var<storage, read_write> v8: array<u32>;
@group(0) @binding(9) var<storage, read_write> scales: array<f32>;    // [2, n_blocks]: absmax of m, of sqrt(v)
@group(0) @binding(10) var<storage, read> qmap: array<f32>;           // [2, 256]: signed map, unsigned map
@group(0) @binding(11) var<storage, read_write> previous: array<f32>;  // [P] params before the last applied update

var<workgroup> red2: array<f32, 256>;   // the second operand of the 8-bit update's max (the first: reduce_scratch)

// Pass 1 of the norm: workgroup w sums g^2 over indices w*WG + lid + k*(n_partials*WG), a fixed partition.
@compute @workgroup_size(256)
fn grad_norm_partial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    var s = 0.0;
    for (var i = wid.x * WG + lid; i < hyper.n; i += hyper.n_partials * WG) {
        let g = grads[i];
        s += g * g;
    }
    let total = workgroup_sum(s, lid);
    if (lid == 0u) { partials[wid.x] = total; }
}

// Pass 2: one workgroup adds the partials and writes stats[1] = sqrt(sum g^2).
@compute @workgroup_size(256)
fn grad_norm_final(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < hyper.n_partials; i += WG) { s += partials[i]; }
    let total = workgroup_sum(s, lid);
    if (lid == 0u) { stats[1] = sqrt(total); }
}

// One invocation: decide skip and clip scale, and count the update, before any update kernel reads them.
@compute @workgroup_size(1)
fn optimizer_prepare() {
    let norm = stats[1];
    let skip = !(is_finite(stats[0]) && is_finite(norm));
    var clip = 1.0;
    if (hyper.max_norm > 0.0) { clip = min(1.0, hyper.max_norm / (norm + 1e-6)); }  // clip_grad_norm_
    stats[2] = select(clip, 0.0, skip);     // 0 = nothing applied
    stats[3] = select(0.0, 1.0, skip);
    if (!skip) { stats[4] = stats[4] + 1.0; }
}

fn elem(gid: vec3<u32>) -> u32 {
    return gid.y * hyper.row_stride + gid.x;
}

// beta^t without pow(0, t), which WGSL leaves undefined.
fn one_minus_pow(beta: f32, t: f32) -> f32 {
    if (beta == 0.0) { return 1.0; }
    return 1.0 - pow(beta, t);
}

// p <- p * (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2;
// p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)       (torch.optim.AdamW, single tensor)
@compute @workgroup_size(256)
fn adamw_update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = elem(gid);
    if (i >= hyper.n) { return; }
    if (stats[3] == 0.0) {
        let g = grads[i] * stats[2];
        let t = stats[4];
        let m = m32[i] + (1.0 - hyper.beta1) * (g - m32[i]);
        let v = hyper.beta2 * v32[i] + (1.0 - hyper.beta2) * g * g;
        m32[i] = m;
        v32[i] = v;
        let denom = sqrt(v) / sqrt(one_minus_pow(hyper.beta2, t)) + hyper.eps;
        let step_size = hyper.lr / one_minus_pow(hyper.beta1, t);
        previous[i] = params[i];
        params[i] = params[i] * (1.0 - hyper.lr * hyper.weight_decay) - step_size * m / denom;
    }
    grads[i] = 0.0;
}

// p <- p * (1 - lr wd) - lr g   (decay decoupled like AdamW's, not torch.optim.SGD's coupled one)
@compute @workgroup_size(256)
fn sgd_update(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = elem(gid);
    if (i >= hyper.n) { return; }
    if (stats[3] == 0.0) {
        previous[i] = params[i];
        params[i] = params[i] * (1.0 - hyper.lr * hyper.weight_decay) - hyper.lr * (grads[i] * stats[2]);
    }
    grads[i] = 0.0;
}

// ---- 8-bit AdamW ----------------------------------------------------------------------------------------
// Moments are stored as 8-bit codes into bitsandbytes' dynamic (tree) maps with one absmax scale per block:
// value = qmap[code] * absmax. m uses the signed map; the unsigned one stores sqrt(v), not v, so 7 decades of
// codes cover 14 of v (why: engine.backends.optimizers.HostAdamW8bit, the numpy twin of this kernel). One workgroup per block; each thread
// owns 4 consecutive values (one code word) per round. Pass 1 dequantises, updates the moments in f32 and finds
// the new absmaxes; pass 2 recomputes the same moments, updates p from them (f32, as bitsandbytes does) and
// requantises. An all-zero block gets scale 0, whose codes all dequantise to 0 (no division by zero).

fn unpack(word: u32, map_base: u32) -> vec4<f32> {
    return vec4<f32>(qmap[map_base + (word & 0xffu)], qmap[map_base + ((word >> 8u) & 0xffu)],
                     qmap[map_base + ((word >> 16u) & 0xffu)], qmap[map_base + (word >> 24u)]);
}

// Code of the map entry nearest to x (ties to the lower code): binary search on the sorted 256-entry map.
fn quantise(x: f32, map_base: u32) -> u32 {
    var lo = 0u;                     // invariant: qmap[lo] <= x, or lo = 0
    var hi = 255u;
    for (var it = 0u; it < 8u; it++) {
        let mid = (lo + hi + 1u) / 2u;
        if (qmap[map_base + mid] <= x) { lo = mid; } else { hi = mid - 1u; }
    }
    let up = min(lo + 1u, 255u);
    if (x - qmap[map_base + lo] > qmap[map_base + up] - x) { return up; }
    return lo;
}

fn pack(v: vec4<f32>, scale: f32, map_base: u32) -> u32 {
    let inv = select(0.0, 1.0 / scale, scale > 0.0);
    return quantise(v.x * inv, map_base) | (quantise(v.y * inv, map_base) << 8u)
         | (quantise(v.z * inv, map_base) << 16u) | (quantise(v.w * inv, map_base) << 24u);
}

struct Moments { m: vec4<f32>, v: vec4<f32>, g: vec4<f32> }

// New moments of the 4 values starting at element e (values past P read as g = 0).
fn moments8(e: u32, m_scale: f32, v_scale: f32, clip: f32) -> Moments {
    var g = vec4<f32>(0.0);
    if (e < hyper.n) { g.x = grads[e]; }
    if (e + 1u < hyper.n) { g.y = grads[e + 1u]; }
    if (e + 2u < hyper.n) { g.z = grads[e + 2u]; }
    if (e + 3u < hyper.n) { g.w = grads[e + 3u]; }
    g *= clip;
    let m_old = unpack(m8[e / 4u], 0u) * m_scale;
    let r_old = unpack(v8[e / 4u], 256u) * v_scale;      // sqrt(v)
    let v_old = r_old * r_old;
    let m = m_old + (1.0 - hyper.beta1) * (g - m_old);
    let v = hyper.beta2 * v_old + (1.0 - hyper.beta2) * g * g;
    return Moments(m, v, g);
}

@compute @workgroup_size(256)
fn adamw8bit_update(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let block = wid.y * hyper.blocks_per_row + wid.x;
    let in_range = block < hyper.n_blocks;                 // the folded grid may overshoot by < one row
    let b = min(block, hyper.n_blocks - 1u);
    let start = b * hyper.block_size;
    let end = min(start + hyper.block_size, hyper.n);
    let skip = stats[3] != 0.0;
    let clip = stats[2];
    let m_scale = scales[b];                               // read before thread 0 overwrites them below
    let v_scale = scales[hyper.n_blocks + b];

    var m_max = 0.0;
    var v_max = 0.0;
    for (var e = start + 4u * lid; e < end; e += 4u * WG) {
        let mo = moments8(e, m_scale, v_scale, clip);
        let am = abs(mo.m);
        m_max = max(m_max, max(max(am.x, am.y), max(am.z, am.w)));
        let r = sqrt(mo.v);
        v_max = max(v_max, max(max(r.x, r.y), max(r.z, r.w)));
    }
    // Max over the workgroup (both at once: reduce_scratch for m, red2 for v).
    reduce_scratch[lid] = m_max;
    red2[lid] = v_max;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            reduce_scratch[lid] = max(reduce_scratch[lid], reduce_scratch[lid + s]);
            red2[lid] = max(red2[lid], red2[lid + s]);
        }
        workgroupBarrier();
    }
    let new_m_scale = reduce_scratch[0];
    let new_v_scale = red2[0];
    if (!in_range) { return; }

    let t = stats[4];
    let step_size = hyper.lr / one_minus_pow(hyper.beta1, t);
    let bc2_sqrt = sqrt(one_minus_pow(hyper.beta2, t));
    let decay = 1.0 - hyper.lr * hyper.weight_decay;
    for (var e = start + 4u * lid; e < end; e += 4u * WG) {
        if (!skip) {
            let mo = moments8(e, m_scale, v_scale, clip);
            let upd = step_size * mo.m / (sqrt(mo.v) / bc2_sqrt + hyper.eps);
            for (var j = e; j < min(e + 4u, end); j++) { previous[j] = params[j]; }
            if (e < end) { params[e] = params[e] * decay - upd.x; }
            if (e + 1u < end) { params[e + 1u] = params[e + 1u] * decay - upd.y; }
            if (e + 2u < end) { params[e + 2u] = params[e + 2u] * decay - upd.z; }
            if (e + 3u < end) { params[e + 3u] = params[e + 3u] * decay - upd.w; }
            m8[e / 4u] = pack(mo.m, new_m_scale, 0u);
            v8[e / 4u] = pack(sqrt(mo.v), new_v_scale, 256u);
        }
        for (var j = e; j < min(e + 4u, end); j++) { grads[j] = 0.0; }
    }
    if (lid == 0u && !skip) {
        scales[b] = new_m_scale;
        scales[hyper.n_blocks + b] = new_v_scale;
    }
}
