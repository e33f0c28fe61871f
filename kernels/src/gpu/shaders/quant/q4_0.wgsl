// d: f16, qs: 16 bytes; element j is nibble (j < 16 ? low : high) of qs[j % 16].
const QK: u32 = 32u;
const BB: u32 = 18u;
fn deq(blk: u32, j: u32) -> f32 {
    let b = byte_at(blk + 2u + (j & 15u));
    let q = select(b & 15u, b >> 4u, j >= 16u);
    return f32(i32(q) - 8) * f16_at(blk);
}
