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

/// Runs `f` on a worker of the global rayon pool and waits for it. A thread outside the pool
/// that starts parallel work hands every `par_iter` to the pool and sleeps on a futex until
/// it is done; a decoding step makes a few hundred such calls, and the wake-ups cost more
/// than the work of the small ones. On a worker, the nested calls split work with the other
/// workers directly. Inline when already on a worker.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    #[test]
    fn on_pool_runs_on_a_worker_and_returns_its_value() {
        assert_eq!(rayon::current_thread_index(), None, "the test thread is outside the pool");
        let (on_worker, v) = super::on_pool(|| (rayon::current_thread_index().is_some(), 41 + 1));
        assert!(on_worker);
        assert_eq!(v, 42);
        // Nested calls run inline on the same worker.
        let same = super::on_pool(|| {
            let outer = rayon::current_thread_index();
            super::on_pool(|| rayon::current_thread_index() == outer)
        });
        assert!(same);
    }
}
