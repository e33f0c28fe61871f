// y[t][row0 + r] = dot(row r of W, x[t]) for a chunk of a quantised weight
// matrix: one workgroup per (row, token), the row's elements dequantised in
// place and spread over the workgroup, partial sums reduced in shared memory.
// X holds activations already rounded as the CPU's vec-dot format rounds
// them (act_quant.wgsl); S their per-block sums where the weight type has a
// min (Q4_1, Q5_1).

struct P {
    rows: u32,      // rows in this chunk
    cols: u32,
    row_bytes: u32,
    row0: u32,      // first row of this chunk in the whole matrix
    x_stride: u32,
    y_stride: u32,
    grid_x: u32,    // workgroups along x (rows beyond wrap to y)
    s_stride: u32,  // blocks per activation row in S
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> S: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<uniform> p: P;

const WG: u32 = 64u;
var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wg.x + wg.y * p.grid_x;
    let t = wg.z;
    var acc = 0.0;
    if r < p.rows {
        let base = r * p.row_bytes;
        let xo = t * p.x_stride;
        for (var i = lid; i < p.cols; i += WG) {
            let blk = base + (i / QK) * BB;
            acc += deq_scaled(blk, i % QK) * X[xo + i];
            if HAS_MIN && (i % QK) == 0u {
                acc += deq_min(blk) * S[t * p.s_stride + i / QK];
            }
        }
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u && r < p.rows {
        Y[t * p.y_stride + p.row0 + r] = part[0];
    }
}
