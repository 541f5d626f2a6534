// The gated MLP's activation, elementwise over [B·T, intermediate]: h = act(g) ⊙ u, with act chosen by the
// ACTIVATION override:
//   0 SwiGLU: silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g)));
//   1 GeGLU (Gemma's gelu_pytorch_tanh): gelu(g) = ½g(1 + tanh(a)), a = √(2/π)(g + 0.044715g³), computed as
//     g·σ(2a) (½(1 + tanh(a)) = σ(2a), and 1 − tanh²(a) = 4σ(2a)(1 − σ(2a))): no 1 + tanh cancellation in the
//     negative tail, and σ saturates to 0 or 1 where e^{-2a} overflows or vanishes;
//     gelu'(g) = σ(2a) + 2g·σ(2a)(1 − σ(2a))·√(2/π)(1 + 3·0.044715g²).
// Backward: dg = dh ⊙ u ⊙ act'(g), du = dh ⊙ act(g).
struct Params { n: u32, row_stride: u32, _pad0: u32, _pad1: u32 }

override ACTIVATION: u32 = 0u;
const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_KAPPA: f32 = 0.044715;

@group(0) @binding(0) var<storage, read_write> out: array<f32>;   // forward: h; backward: dg
@group(0) @binding(1) var<storage, read_write> out2: array<f32>;  // backward: du (forward: unused)
@group(0) @binding(2) var<storage, read> gate: array<f32>;
@group(0) @binding(3) var<storage, read> up: array<f32>;
@group(0) @binding(4) var<storage, read> dh: array<f32>;          // backward only
@group(0) @binding(5) var<uniform> params: Params;

fn sigmoid(v: f32) -> f32 { return 1.0 / (1.0 + exp(-v)); }

// (act(g), act'(g))
fn activation(g: f32) -> vec2<f32> {
    if (ACTIVATION == 1u) {
        let s = sigmoid(2.0 * SQRT_2_OVER_PI * (g + GELU_KAPPA * g * g * g));
        let d = s + 2.0 * g * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_KAPPA * g * g);
        return vec2<f32>(g * s, d);
    }
    let s = sigmoid(g);
    return vec2<f32>(g * s, s * (1.0 + g * (1.0 - s)));
}

@compute @workgroup_size(256)
fn swiglu_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    if (i >= params.n) { return; }
    out[i] = activation(gate[i]).x * up[i];
}

@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    if (i >= params.n) { return; }
    let a = activation(gate[i]);
    let d = dh[i];
    out[i] = d * up[i] * a.y;
    out2[i] = d * a.x;
}
