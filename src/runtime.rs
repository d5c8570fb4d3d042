//! Process-wide threading set-up, done once before any tensor work.

/// Sizes the global rayon pool (our kernels and the GEMMs run on it) and keeps candle's own
/// element-wise pool to one thread: that pool waits on a spinning barrier, and on a machine
/// whose cores rayon already keeps busy it only competes with the real work (profiled: 16% of
/// a training step spent spinning). Later calls keep the first pool size.
pub fn init_threads(threads: usize) {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    }
}
