// Softmax cross-entropy of one row chunk of the LM head's logits, and the step's loss reduction.
//
// The LM head never materialises all B·T·vocab logits: the engine computes `logits` for a chunk of rows
// ([rows, vocab], by linear.wgsl's GEMM over each vocabulary piece), runs cross_entropy_forward on it, which
// turns the chunk in place into d(loss)/d(logits) when the step wants gradients, then multiplies back into
// d(hidden) before the next chunk reuses the buffer.
// Loss convention (Hugging Face): target[row] is the already shifted label, −100 does not count, and the loss
// is the sum over counted rows divided by the step's counted tokens (inv_count, known on the host up front).
// row_weight scales each row's gradient (not its loss): 1 for supervised steps; for the preference objectives
// −∂L/∂S of the row's sequence (engine/backends/preference.py), so the backward computes dL/dθ exactly.
// Final-logit soft-capping (SOFTCAP > 0, Gemma 2's final_logit_softcapping): the loss reads SOFTCAP·tanh(z / SOFTCAP)
// of each logit z, and d(loss)/dz carries its derivative 1 − tanh².
struct Chunk { rows: u32, vocab: u32, row0: u32, n_total: u32 }
struct Step { inv_count: f32, count: f32, write_grad: u32, _pad0: u32 }

const WG: u32 = 256u;
override SOFTCAP: f32 = 0.0;
var<workgroup> red_max: array<f32, 256>;
var<workgroup> red_sum: array<f32, 256>;

@group(0) @binding(0) var<storage, read_write> logits: array<f32>;    // [rows, vocab] → dlogits
@group(0) @binding(1) var<storage, read_write> row_loss: array<f32>;  // [B·T] loss·inv_count, summed over micro-batches
@group(0) @binding(2) var<storage, read> targets: array<i32>;         // [B·T] shifted labels
@group(0) @binding(3) var<uniform> chunk: Chunk;
@group(0) @binding(4) var<uniform> step: Step;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;     // loss_reduce only: [16]
@group(0) @binding(6) var<storage, read> row_weight: array<f32>;      // [B·T] gradient weight per row

// tanh's argument clamped where tanh is 1 in f32 already, so no implementation overflows inside it.
fn capped(z: f32) -> f32 {
    if (SOFTCAP == 0.0) { return z; }
    return SOFTCAP * tanh(clamp(z / SOFTCAP, -15.0, 15.0));
}

@compute @workgroup_size(256)
fn cross_entropy_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wg.x;
    let base = r * chunk.vocab;
    let tgt = targets[chunk.row0 + r];
    // Online max / sum of exponentials per invocation, then merged across the workgroup.
    var m = -3.0e38;
    var s = 0.0;
    for (var v = lid; v < chunk.vocab; v += WG) {
        let z = capped(logits[base + v]);
        if (z > m) { s = s * exp(m - z) + 1.0; m = z; } else { s += exp(z - m); }
    }
    red_max[lid] = m;
    red_sum[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) {
            let m2 = max(red_max[lid], red_max[lid + k]);
            red_sum[lid] = red_sum[lid] * exp(red_max[lid] - m2) + red_sum[lid + k] * exp(red_max[lid + k] - m2);
            red_max[lid] = m2;
        }
        workgroupBarrier();
    }
    let lse = red_max[0] + log(red_sum[0]);
    let counted = tgt >= 0;
    if (lid == 0u && counted) {
        row_loss[chunk.row0 + r] += (lse - capped(logits[base + u32(tgt)])) * step.inv_count;
    }
    if (step.write_grad == 0u) { return; }
    let scale = step.inv_count * row_weight[chunk.row0 + r];
    workgroupBarrier();   // everyone has read logits[target] before it is overwritten
    for (var v = lid; v < chunk.vocab; v += WG) {
        var g = 0.0;
        if (counted) {
            let z = capped(logits[base + v]);
            g = exp(z - lse);
            if (v == u32(tgt)) { g -= 1.0; }
            if (SOFTCAP != 0.0) { g *= 1.0 - (z / SOFTCAP) * (z / SOFTCAP); }
            g *= scale;
        }
        logits[base + v] = g;
    }
}

// stats[0] = Σ row_loss (the mean loss of the step, or with inv_count 1 the summed loss), stats[5] = counted
// tokens; row_loss is zeroed for the next step. One workgroup.
@compute @workgroup_size(256)
fn loss_reduce(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < chunk.n_total; i += WG) { s += row_loss[i]; row_loss[i] = 0.0; }
    red_sum[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) { red_sum[lid] += red_sum[lid + k]; }
        workgroupBarrier();
    }
    if (lid == 0u) {
        stats[0] = red_sum[0];
        stats[5] = step.count;
    }
}

// Grid: one workgroup per row of the chunk. The model's logits as it outputs them, soft-capped in place, for a
// read-back (the loss above caps as it reads).
@compute @workgroup_size(256)
fn soft_cap_logits(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wg.x * chunk.vocab;
    for (var v = lid; v < chunk.vocab; v += WG) { logits[base + v] = capped(logits[base + v]); }
}
