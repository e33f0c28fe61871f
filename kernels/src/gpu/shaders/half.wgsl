// Rounds to the nearest f16 and back, as ggml does where it stores halves.
fn round_f16(x: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}
