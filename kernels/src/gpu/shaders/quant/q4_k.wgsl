// d: f16, dmin: f16, scales: 12 bytes, qs: 128 bytes.
const QK: u32 = 256u;
const BB: u32 = 144u;
fn deq(blk: u32, j: u32) -> f32 {
    let r = j % 64u;
    let b = byte_at(blk + 16u + (j / 64u) * 32u + (r % 32u));
    let q = select(b & 15u, b >> 4u, r >= 32u);
    let sm = scale_min_k4(blk + 4u, j / 32u);
    return f16_at(blk) * f32(sm.x) * f32(q) - f16_at(blk + 2u) * f32(sm.y);
}
