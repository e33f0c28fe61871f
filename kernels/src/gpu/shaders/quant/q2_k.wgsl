// scales: 16 bytes (low nibble scale, high nibble min), qs: 64 bytes of
// 2-bit values, d: f16, dmin: f16.
const QK: u32 = 256u;
const BB: u32 = 84u;
fn deq(blk: u32, j: u32) -> f32 {
    let half = j / 128u;
    let r = j % 128u;
    let q = (byte_at(blk + 16u + half * 32u + (r % 32u)) >> (2u * (r / 32u))) & 3u;
    let sc = byte_at(blk + j / 16u);
    return f16_at(blk + 80u) * f32(sc & 15u) * f32(q) - f16_at(blk + 82u) * f32(sc >> 4u);
}
