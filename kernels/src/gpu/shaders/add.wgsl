// a[i] += b[i % b_len] (residual adds, and biases broadcast over rows), and
// a plain copy.

struct P {
    len: u32,
    b_len: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<storage, read_write> A: array<f32>;
@group(0) @binding(1) var<storage, read> B: array<f32>;
@group(0) @binding(2) var<uniform> p: P;

@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * p.grid_x) * 64u + lid;
    if i < p.len {
        A[i] += B[i % p.b_len];
    }
}

@compute @workgroup_size(64)
fn copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * p.grid_x) * 64u + lid;
    if i < p.len {
        A[i] = B[i];
    }
}
