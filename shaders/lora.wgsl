// LoRA dropout: the LoRA branch sees dropout(x) = x ⊙ keep / (1 − p), keep ~ Bernoulli(1 − p).
// The mask comes from a counter-based hash of (step seed, salt = which layer and projection, element index),
// so backward regenerates exactly the forward's mask instead of storing it, and a run is reproducible.
// The same entry point is the backward: with `accumulate` it adds mask ⊙ g / (1 − p) to the input gradient.
// (The branch's matrix products themselves run on linear.wgsl's GEMM: u = x·Aᵀ, y += s·u·Bᵀ and their grads.)
struct Params { n: u32, row_stride: u32, salt: u32, accumulate: u32 }
// Per step: the seed, and p (the backend sets p = 0 for evaluation, which makes dropout the identity).
struct Step { seed: u32, p: f32, _pad0: u32, _pad1: u32 }

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<uniform> step: Step;

// PCG-style integer hash (Jarzynski & Olano 2020).
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn uniform01(i: u32) -> f32 {
    let h = pcg(i ^ pcg(params.salt ^ pcg(step.seed)));
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

@compute @workgroup_size(256)
fn lora_dropout(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    if (i >= params.n) { return; }
    var v = 0.0;
    if (uniform01(i) >= step.p) { v = x[i] / (1.0 - step.p); }
    if (params.accumulate != 0u) { v += out[i]; }
    out[i] = v;
}
