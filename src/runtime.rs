//! Process-wide set-up, done once before any tensor work: threads and the allocator.

/// Sizes the global rayon pool (our kernels and the GEMMs run on it) and keeps candle's own
/// element-wise pool to one thread: that pool waits on a spinning barrier, and on a machine
/// whose cores rayon already keeps busy it only competes with the real work (profiled: 16% of
/// a training step spent spinning). Later calls keep the first pool size.
pub fn init_threads(threads: usize) {
    tune_allocator();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    }
}

/// A training step frees and re-allocates the same activation-sized buffers (1–25 MB) hundreds
/// of times. glibc serves blocks that large with fresh `mmap`s and returns them on free, so
/// every step paid page faults and kernel page zeroing for all of them (≈8% of a step in the
/// profile). Serving them from the heap and not trimming it lets the memory be reused; the
/// peak stays what the step needs at once.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; called before the threads
            // that allocate heavily exist.
            unsafe {
                // 32 MiB is the largest value glibc accepts on 64-bit.
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}
