// Weight types without a per-block min.
const HAS_MIN: bool = false;
fn deq_min(blk: u32) -> f32 {
    return 0.0;
}
fn deq_scaled(blk: u32, j: u32) -> f32 {
    return deq(blk, j);
}
