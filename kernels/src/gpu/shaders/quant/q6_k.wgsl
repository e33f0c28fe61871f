// ql: 128 bytes, qh: 64 bytes, scales: 16 signed bytes, d: f16.
const QK: u32 = 256u;
const BB: u32 = 210u;
fn deq(blk: u32, j: u32) -> f32 {
    let n = j / 128u;
    let p = j % 128u;
    let l = p % 32u;
    let quarter = p / 32u;
    let ql = byte_at(blk + n * 64u + l + select(0u, 32u, (quarter % 2u) == 1u));
    let low = select(ql >> 4u, ql & 15u, quarter < 2u);
    let high = (byte_at(blk + 128u + n * 32u + l) >> (2u * quarter)) & 3u;
    let q = i32(low | (high << 4u)) - 32;
    return f16_at(blk + 208u) * f32(i8_of(byte_at(blk + 192u + j / 16u))) * f32(q);
}
