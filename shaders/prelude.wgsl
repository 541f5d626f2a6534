// Helpers shared by kernel families, included with `#include "prelude.wgsl"` (the shader loader,
// engine/backends/wgpu/context.py shader_source, pastes it once per shader).
// An includer that calls workgroup_sum declares `const WG: u32`, its workgroup size: a power of two <= 256.

// Scratch of workgroup_sum; an includer may reuse it for reductions of its own between calls (the optimizer's max).
var<workgroup> reduce_scratch: array<f32, 256>;

// Sum of `v` over the workgroup, returned to every invocation. A fixed tree order, so results do not depend on
// scheduling.
fn workgroup_sum(v: f32, lid: u32) -> f32 {
    reduce_scratch[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) { reduce_scratch[lid] += reduce_scratch[lid + s]; }
        workgroupBarrier();
    }
    let total = reduce_scratch[0];
    workgroupBarrier();
    return total;
}

// Inf and NaN have every exponent bit set; a bit test cannot be optimised away as x != x or x <= MAX can.
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}
