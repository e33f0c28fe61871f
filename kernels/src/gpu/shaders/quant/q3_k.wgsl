// hmask: 32 bytes, qs: 64 bytes of 2-bit values, scales: 12 bytes packing
// sixteen 6-bit scales, d: f16.
const QK: u32 = 256u;
const BB: u32 = 110u;
fn deq(blk: u32, j: u32) -> f32 {
    let half = j / 128u;
    let r = j % 128u;
    let step = r / 32u;
    let l = r % 32u;
    let low = i32((byte_at(blk + 32u + half * 32u + l) >> (2u * step)) & 3u);
    let m = 1u << (half * 4u + step);
    let q = low - select(4, 0, (byte_at(blk + l) & m) != 0u);
    let is = j / 16u;
    let sl = (byte_at(blk + 96u + (is % 8u)) >> (4u * (is / 8u))) & 15u;
    let sh = (byte_at(blk + 104u + (is % 4u)) >> (2u * (is / 4u))) & 3u;
    let sc = i32(sl | (sh << 4u)) - 32;
    return f16_at(blk + 108u) * f32(sc) * f32(q);
}
