//! Which thread pools run candle's CPU kernels in hone's process.

/// Keeps candle's element-wise ops on the calling thread (unless the user
/// set `CANDLE_NUM_THREADS`), leaving the cores to rayon's pool, which runs
/// the matrix products (gemm) and hone's fused ops.
///
/// candle 0.11 splits large element-wise ops over a second pool of its own
/// whose workers spin for a while after each op. On two cores they then
/// contend with gemm's threads for the CPU: the LM benchmark's training
/// step took a median 162 ms with that pool and 138 ms without it
/// (docs/benchmarks.md). Element-wise ops are bound by memory bandwidth and
/// gain little from a second thread. Call it first in `main`, before any
/// thread starts and before candle's first op reads the variable.
pub fn one_kernel_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
