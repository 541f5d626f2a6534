// Widen a weight held in one of the storage formats of weight_formats.wgsl to f32 rows: out [rows, cols].
// For tests of those load functions (and for inspecting an uploaded weight); training reads the formats
// inside the GEMM's tile loads and never expands a weight like this.
// One invocation writes 4 consecutive weights of one row; the last group of a row whose cols is not a
// multiple of 4 (f32/f16/bf16 only) writes just the weights that exist.
#include "weight_formats.wgsl"

struct Params { rows: u32, cols: u32, row_blocks: u32, groups_x: u32 }

override FORMAT: u32 = 0u;   // FMT_* (a GGML type id)

@group(0) @binding(0) var<storage, read_write> out: array<f32>;   // [rows, cols]
@group(0) @binding(1) var<storage, read> weights: array<u32>;     // the weight in the GPU layout
@group(0) @binding(2) var<uniform> params: Params;

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn dequant_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let groups_per_row = (params.cols + 3u) / 4u;
    let item = (wg.y * params.groups_x + wg.x) * WG + lid;
    if (item >= params.rows * groups_per_row) { return; }
    let row = item / groups_per_row;
    let k = (item % groups_per_row) * 4u;
    let v = weight_load4(FORMAT, params.row_blocks, row, k);
    let at = row * params.cols + k;
    out[at] = v.x;
    if (k + 1u < params.cols) { out[at + 1u] = v.y; }
    if (k + 2u < params.cols) { out[at + 2u] = v.z; }
    if (k + 3u < params.cols) { out[at + 3u] = v.w; }
}
