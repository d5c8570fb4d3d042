//! Runs the parser fuzzer (see `ferrotune::fuzz`) and prints, per parser, the cases run, how
//! many parsed, how many were refused with an error, and every failure.
//!
//! ```text
//! cargo run --release --example fuzz -- [--cases N] [--seed S] [--only NAME] [--case I] [--dump FILE]
//! ```
//! `--case I` runs the single case `I` (of `--only NAME`) to reproduce a failure; with
//! `--dump FILE` its input is written to FILE first. Exits 1 if any case failed.

use ferrotune::fuzz::{self, alloc::TrackingAlloc, Options};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

fn main() {
    let mut cases = 10_000u64;
    let mut seed = 1u64;
    let mut only: Option<String> = None;
    let mut single: Option<u64> = None;
    let mut dump: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        let num = |v: String| v.parse::<u64>().unwrap_or_else(|_| usage(&format!("{a}: `{v}` is not a number")));
        match a.as_str() {
            "--cases" => cases = num(val()),
            "--seed" => seed = num(val()),
            "--only" => only = Some(val()),
            "--case" => single = Some(num(val())),
            "--dump" => dump = Some(val()),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    let work = fuzz::scratch_dir("example").expect("creating the scratch folder");
    let targets = fuzz::all_targets(&work).unwrap_or_else(|e| {
        eprintln!("cannot build the fuzz fixtures: {e}");
        std::process::exit(2)
    });
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    let selected: Vec<_> = targets.into_iter().filter(|t| only.as_deref().is_none_or(|o| o == t.name)).collect();
    if selected.is_empty() {
        usage(&format!("no target named {:?} (targets: {})", only.unwrap_or_default(), names.join(", ")));
    }
    if let Some(case) = single {
        let t = &selected[0];
        let input = t.input(seed, case);
        if let Some(path) = &dump {
            std::fs::write(path, &input).expect("writing the dump");
            println!("wrote {} bytes to {path}", input.len());
        }
        let dir = work.join(t.name);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        println!("{} case {case}: {:?}", t.name, (t.run)(&input, &dir).map_err(|e| e.to_string()));
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    let opts = Options::new(seed, cases, work.clone());
    println!("seed {seed}, {cases} cases per parser, allocation check {}", if fuzz::alloc::installed() { "on" } else { "off" });
    println!("{:<26} {:>9} {:>9} {:>9} {:>7} {:>8}", "parser", "cases", "ok", "errors", "fails", "seconds");
    // Two parsers at a time: the reference machine has two cores.
    let reports = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(t) = selected.get(i) else { break };
                let r = fuzz::run_target(t, &opts);
                // One print per target, failures included, so parallel output does not interleave.
                let mut out = format!(
                    "{:<26} {:>9} {:>9} {:>9} {:>7} {:>8.1}\n",
                    r.target, r.cases, r.ok, r.errors, r.failures.len(), r.elapsed.as_secs_f64()
                );
                for f in r.failures.iter().take(20) {
                    out += &format!("  FAIL {}: {f} (reproduce: --only {} --seed {seed} --case {})\n", r.target, r.target, f.case);
                }
                if std::env::var_os("FUZZ_SHOW_ERRORS").is_some() {
                    for e in &r.sample_errors {
                        out += &format!("  {} error: {}\n", r.target, e.chars().take(200).collect::<String>());
                    }
                }
                print!("{out}");
                reports.lock().expect("no poisoning").push(r);
            });
        }
    });
    let reports = reports.into_inner().expect("no poisoning");
    let total: u64 = reports.iter().map(|r| r.cases).sum();
    let failed: usize = reports.iter().map(|r| r.failures.len()).sum();
    let panics: usize = reports.iter().map(|r| r.panics()).sum();
    println!("total: {total} cases, {failed} failures ({panics} panics)");
    let _ = std::fs::remove_dir_all(&work);
    std::process::exit((failed > 0) as i32);
}

fn usage(msg: &str) -> ! {
    eprintln!("{msg}\nusage: fuzz [--cases N] [--seed S] [--only NAME] [--case I] [--dump FILE]");
    std::process::exit(2)
}
