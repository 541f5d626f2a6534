// Frozen weights in their storage formats, widened to f32 four at a time for a GEMM's tile loads.
// Include-only: no entry points, no bindings. The includer declares the weight buffer under this name:
//     @group(0) @binding(N) var<storage, read> weights: array<u32>;
// and calls `<format>_load4(row_blocks, row, k)` (or `weight_load4(format, …)`, which folds to one of them when
// `format` is an override constant) for a row-major [rows, cols] weight, k a multiple of 4, k + 3 < cols for the
// block formats (whole blocks: cols % block == 0, engine.model.weight_formats refuses other shapes). row_blocks is the
// row's block count, cols / block_size (cols itself for f32/f16/bf16, whose block is one weight).
// The result is weights k..k+3 of `row`, equal bit for bit to engine.model.weight_formats.dequantize (and gguf-py):
// the f16 scales are widened exactly and combined in the same f32 operations and order. (A compiler may fuse
// q4_1's d·q + m and the k-quants' ds·q − dm into one fma, which rounds once instead of twice: at most one
// f32 rounding, ~6e-8 relative, apart; tests/test_kernel_dequant.py states what it saw.)
//
// GPU layout (made on upload by engine.model.weight_formats.to_gpu_layout, which says the same). GGUF blocks are
// 18 (q4_0), 34 (q8_0), 210 (q6_k) bytes: not word aligned, and WGSL reads storage by u32 only. So each row is
// re-packed as
//     [quant bytes of blocks 0..rb-1][meta bytes of blocks 0..rb-1][zero pad to a whole u32]
// quant = the packed integers, a multiple of 4 bytes per block (4 consecutive weights share one u32, so one
// load4 is one or two u32 reads of integers plus its scale words); meta = the scales/minimums as GGUF stores
// them (f16 bits). Rows are independent: row r starts at word r · row_words. Per block (bytes):
//     format  quant               meta                         row_words
//     q8_0    32  int8 qs[32]     2   f16 d                    ceil(rb·34 / 4)
//     q4_0    16  u8 qs[16]       2   f16 d                    ceil(rb·18 / 4)
//     q4_1    16  u8 qs[16]       4   f16 d, f16 m             rb·5
//     q4_k   128  u8 qs[128]      16  f16 d, f16 dmin, u8 scales[12]            rb·36
//     q5_k   160  u8 qh[32], qs[128]  16  as q4_k                               rb·44
//     q6_k   192  u8 ql[128], qh[64]  20  int8 scales[16], f16 d, 2 zero bytes  rb·53
//     f32/f16/bf16: the plain row, padded to a whole u32           ceil(cols·size / 4)
// Memory equals GGUF's except q6_k (+2 bytes per 256 weights, <1%) and odd-rb rows of q8_0/q4_0 (+2 bytes).
// Which weight sits where inside a block (llama.cpp ggml-common.h / dequantize_row_*):
//   q4_0/q4_1: weight i < 16 is the low nibble of qs[i], weight 16 + i the high nibble.
//   q4_k/q5_k: sub-block s (32 weights, s = i / 32) uses nibble s % 2 of qs[32·(s/2) + i % 32]; q5_k's 5th bit
//              is bit s of qh[i % 32]; its 6-bit scale and minimum come from scales[12] (k_scale_min).
//   q6_k: i = 128·h + 32·g + l: low 4 bits = nibble g / 2 of ql[64·h + 32·(g % 2) + l], high 2 bits = bits 2g,
//         2g+1 of qh[32·h + l]; scale = scales[i / 16]; value (q − 32).

const FMT_F32: u32 = 0u;
const FMT_F16: u32 = 1u;
const FMT_Q4_0: u32 = 2u;
const FMT_Q4_1: u32 = 3u;
const FMT_Q8_0: u32 = 8u;
const FMT_Q4_K: u32 = 12u;
const FMT_Q5_K: u32 = 13u;
const FMT_Q6_K: u32 = 14u;
const FMT_BF16: u32 = 30u;   // the GGML type ids (engine.model.weight_formats.WeightFormat values)

// The four bytes of a word, low byte first.
fn wf_bytes(w: u32) -> vec4<u32> {
    return (vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
}

// The four bytes of a word as signed int8, widened.
fn wf_i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// f16 number `i` of the half-word array that starts at word `at` (two per word, low half first).
fn wf_half(at: u32, i: u32) -> f32 {
    let pair = unpack2x16float(weights[at + i / 2u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}

fn f32_load4(cols: u32, row: u32, k: u32) -> vec4<f32> {
    let at = row * cols + k;
    return bitcast<vec4<f32>>(vec4<u32>(weights[at], weights[at + 1u], weights[at + 2u], weights[at + 3u]));
}

fn f16_load4(cols: u32, row: u32, k: u32) -> vec4<f32> {
    let at = row * ((cols + 1u) / 2u) + k / 2u;
    return vec4<f32>(unpack2x16float(weights[at]), unpack2x16float(weights[at + 1u]));
}

fn bf16_load4(cols: u32, row: u32, k: u32) -> vec4<f32> {
    let at = row * ((cols + 1u) / 2u) + k / 2u;
    let a = weights[at];
    let b = weights[at + 1u];
    return bitcast<vec4<f32>>(vec4<u32>(a << 16u, a & 0xffff0000u, b << 16u, b & 0xffff0000u));
}

fn q8_0_load4(row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    let base = row * ((row_blocks * 34u + 3u) / 4u);
    let b = k / 32u;
    let q = weights[base + b * 8u + (k % 32u) / 4u];
    return wf_i8x4(q) * wf_half(base + row_blocks * 8u, b);
}

fn q4_0_load4(row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    let base = row * ((row_blocks * 18u + 3u) / 4u);
    let b = k / 32u;
    let i = k % 32u;
    let q = (wf_bytes(weights[base + b * 4u + (i % 16u) / 4u]) >> vec4<u32>((i / 16u) * 4u)) & vec4<u32>(15u);
    return wf_half(base + row_blocks * 4u, b) * vec4<f32>(vec4<i32>(q) - vec4<i32>(8));
}

fn q4_1_load4(row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    let base = row * row_blocks * 5u;
    let b = k / 32u;
    let i = k % 32u;
    let q = (wf_bytes(weights[base + b * 4u + (i % 16u) / 4u]) >> vec4<u32>((i / 16u) * 4u)) & vec4<u32>(15u);
    let dm = unpack2x16float(weights[base + row_blocks * 4u + b]);
    return dm.x * vec4<f32>(q) + dm.y;
}

// q4_k/q5_k: (d·sc, dmin·m) of sub-block s from the block's 4 meta words (d|dmin, scales[0..3], [4..7], [8..11]).
fn wf_k_scale_min(at_meta: u32, s: u32) -> vec2<f32> {
    let dd = unpack2x16float(weights[at_meta]);
    let lo_s = weights[at_meta + 1u];
    let lo_m = weights[at_meta + 2u];
    let t = (s % 4u) * 8u;
    var sc = (lo_s >> t) & 63u;
    var mn = (lo_m >> t) & 63u;
    if (s >= 4u) {
        let hi = weights[at_meta + 3u] >> t;
        sc = (hi & 15u) | (((lo_s >> (t + 6u)) & 3u) << 4u);
        mn = ((hi >> 4u) & 15u) | (((lo_m >> (t + 6u)) & 3u) << 4u);
    }
    return vec2<f32>(dd.x * f32(sc), dd.y * f32(mn));
}

fn q4_k_load4(row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    let base = row * row_blocks * 36u;
    let b = k / 256u;
    let i = k % 256u;
    let s = i / 32u;
    let word = weights[base + b * 32u + (s / 2u) * 8u + (i % 32u) / 4u];
    let q = (wf_bytes(word) >> vec4<u32>((s % 2u) * 4u)) & vec4<u32>(15u);
    let sm = wf_k_scale_min(base + row_blocks * 32u + b * 4u, s);
    return sm.x * vec4<f32>(q) - sm.y;
}

fn q5_k_load4(row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    let base = row * row_blocks * 44u;
    let b = k / 256u;
    let i = k % 256u;
    let s = i / 32u;
    let quants = base + b * 40u;   // qh: 8 words, then qs: 32 words
    let low = (wf_bytes(weights[quants + 8u + (s / 2u) * 8u + (i % 32u) / 4u]) >> vec4<u32>((s % 2u) * 4u))
        & vec4<u32>(15u);
    let high = (wf_bytes(weights[quants + (i % 32u) / 4u]) >> vec4<u32>(s)) & vec4<u32>(1u);
    let sm = wf_k_scale_min(base + row_blocks * 40u + b * 4u, s);
    return sm.x * vec4<f32>(low | (high << vec4<u32>(4u))) - sm.y;
}

fn q6_k_load4(row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    let base = row * row_blocks * 53u;
    let b = k / 256u;
    let i = k % 256u;
    let h = i / 128u;
    let g = (i % 128u) / 32u;
    let l4 = (i % 32u) / 4u;
    let quants = base + b * 48u;   // ql: 32 words, then qh: 16 words
    let low = (wf_bytes(weights[quants + h * 16u + (g % 2u) * 8u + l4]) >> vec4<u32>((g / 2u) * 4u))
        & vec4<u32>(15u);
    let high = (wf_bytes(weights[quants + 32u + h * 8u + l4]) >> vec4<u32>(2u * g)) & vec4<u32>(3u);
    let at_meta = base + row_blocks * 48u + b * 5u;   // scales: 4 words, then d
    let j = i / 16u;
    let sc = f32(bitcast<i32>(weights[at_meta + j / 4u] << (24u - 8u * (j % 4u))) >> 24u);
    let ds = unpack2x16float(weights[at_meta + 4u]).x * sc;
    return ds * vec4<f32>(vec4<i32>(low | (high << vec4<u32>(4u))) - vec4<i32>(32));
}

// Weights k..k+3 of `row` in `format` (an FMT_* value; with an override constant the switch folds away).
fn weight_load4(format: u32, row_blocks: u32, row: u32, k: u32) -> vec4<f32> {
    switch (format) {
        case FMT_F32: { return f32_load4(row_blocks, row, k); }
        case FMT_F16: { return f16_load4(row_blocks, row, k); }
        case FMT_BF16: { return bf16_load4(row_blocks, row, k); }
        case FMT_Q8_0: { return q8_0_load4(row_blocks, row, k); }
        case FMT_Q4_0: { return q4_0_load4(row_blocks, row, k); }
        case FMT_Q4_1: { return q4_1_load4(row_blocks, row, k); }
        case FMT_Q4_K: { return q4_k_load4(row_blocks, row, k); }
        case FMT_Q5_K: { return q5_k_load4(row_blocks, row, k); }
        case FMT_Q6_K: { return q6_k_load4(row_blocks, row, k); }
        default: { return vec4<f32>(bitcast<f32>(0x7fc00000u)); }   // unknown format: NaN, never silent zeros
    }
}
