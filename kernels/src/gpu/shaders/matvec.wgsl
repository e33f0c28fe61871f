// y[t][row0 + r] = dot(row r of W, x[t]) for a chunk of a quantised weight
// matrix: one workgroup per (row, group of up to 8 tokens), each weight
// dequantised once in place for all the group's tokens, the row spread over
// the workgroup, partial sums reduced in shared memory.
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
    n: u32,         // tokens
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> S: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<uniform> p: P;

const WG: u32 = 64u;
const TG: u32 = 8u;
var<workgroup> part: array<f32, 512>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wg.x + wg.y * p.grid_x;
    let t0 = wg.z * TG;
    let nt = min(TG, p.n - t0);
    var acc: array<f32, 8>;
    if r < p.rows {
        let base = r * p.row_bytes;
        for (var i = lid; i < p.cols; i += WG) {
            let blk = base + (i / QK) * BB;
            let w = deq_scaled(blk, i % QK);
            var m = 0.0;
            let first = (i % QK) == 0u;
            if HAS_MIN && first {
                m = deq_min(blk);
            }
            for (var k = 0u; k < nt; k++) {
                let t = t0 + k;
                acc[k] += w * X[t * p.x_stride + i];
                if HAS_MIN && first {
                    acc[k] += m * S[t * p.s_stride + i / QK];
                }
            }
        }
    }
    for (var k = 0u; k < TG; k++) {
        part[k * WG + lid] = acc[k];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            for (var k = 0u; k < TG; k++) {
                part[k * WG + lid] += part[k * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    if lid < nt && r < p.rows {
        Y[(t0 + lid) * p.y_stride + p.row0 + r] = part[lid * WG];
    }
}
