// Embedding lookup: y[t] = row ids[t] of W, dequantised and scaled, for the
// token ids that fall in this chunk of the table.

struct P {
    cols: u32,
    row_bytes: u32,
    row0: u32,
    rows: u32,
    n: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> IDS: array<u32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> p: P;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= p.cols || t >= p.n {
        return;
    }
    let id = IDS[t];
    if id < p.row0 || id >= p.row0 + p.rows {
        return;
    }
    let v = deq((id - p.row0) * p.row_bytes + (i / QK) * BB, i % QK);
    Y[t * p.cols + i] = v * p.scale;
}
