const QK: u32 = 1u;
const BB: u32 = 2u;
fn deq(blk: u32, j: u32) -> f32 {
    return f16_at(blk);
}
