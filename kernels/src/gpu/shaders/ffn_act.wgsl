// The gated feed-forward activation in place: g = act(g) * u, with SiLU
// (llama, qwen2) or GELU's tanh form (gemma3), the latter rounded through
// f16 as ggml's table-driven CPU GELU is.

struct P {
    len: u32,
    gelu: u32,
    grid_x: u32,
}

@group(0) @binding(0) var<storage, read_write> G: array<f32>;
@group(0) @binding(1) var<storage, read> U: array<f32>;
@group(0) @binding(2) var<uniform> p: P;

fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let h = round_f16(x);
    let y = 0.5 * h * (1.0 + tanh(0.7978846 * h * (1.0 + 0.044715 * h * h)));
    return round_f16(y);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * p.grid_x) * 64u + lid;
    if i >= p.len {
        return;
    }
    let g = G[i];
    var a: f32;
    if p.gelu != 0u {
        a = gelu(g);
    } else {
        a = g / (1.0 + expf(-g));
    }
    G[i] = a * U[i];
}
