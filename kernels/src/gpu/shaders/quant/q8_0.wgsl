// d: f16, qs: 32 signed bytes.
const QK: u32 = 32u;
const BB: u32 = 34u;
fn deq(blk: u32, j: u32) -> f32 {
    return f32(i8_of(byte_at(blk + 2u + j))) * f16_at(blk);
}
