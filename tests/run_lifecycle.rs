//! What happens to a run's output directory when users do what users do: start a second run
//! into it, run two at once, resume with another plan, press Ctrl-C, or kill -9 the process at
//! any instant. Each time nothing trained may be lost, and a resumed run must end with the
//! bytes an uninterrupted one writes.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
}

/// A tiny model, 12 prompt/completion examples and `run.toml` (with `extra` appended) in `dir`.
fn setup(dir: &Path, extra: &str) {
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    let lines: Vec<String> = (0..12)
        .map(|i| serde_json::json!({"prompt": format!("Q{i}: {i} plus {i}?\n"), "completion": format!("{}", 2 * i)}).to_string())
        .collect();
    write_lines(&dir.join("train.jsonl"), &lines);
    write_plan(dir, "run.toml", extra);
}

fn write_plan(dir: &Path, name: &str, extra: &str) {
    let text = format!(
        "base_model = \"model\"\ndatasets = [{{ path = \"train.jsonl\" }}]\nlora_r = 2\nlora_alpha = 4\nlora_dropout = 0.1\n\
         lora_target_modules = \"all-linear\"\nsequence_len = 32\nmicro_batch_size = 2\nlearning_rate = 1e-2\noutput_dir = \"out\"\n{extra}\n"
    );
    std::fs::write(dir.join(name), text).unwrap();
}

fn train(dir: &Path, args: &[&str]) -> Output {
    bin().arg("train").arg("run.toml").args(args).current_dir(dir).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

#[test]
fn a_new_run_never_silently_replaces_an_earlier_one() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir, "max_steps = 3\nsave_steps = 1");
    let first = train(dir, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let adapter3 = read(dir.join("out/adapter/adapter_model.safetensors"));
    std::fs::write(dir.join("out/notes.txt"), "mine").unwrap();

    // A second plain run into the same folder is refused and changes nothing.
    let metrics_before = read(dir.join("out/metrics.jsonl"));
    let o = train(dir, &["--set", "max_steps=1"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("already holds a run") && e.contains("checkpoints/step-3") && e.contains("--overwrite"), "{e}");
    assert_eq!(read(dir.join("out/metrics.jsonl")), metrics_before);
    assert_eq!(read(dir.join("out/adapter/adapter_model.safetensors")), adapter3);

    // --resume of the finished run with fewer steps is refused: the finished adapter stays.
    let o = train(dir, &["--resume", "--set", "max_steps=1"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("max_steps") && e.contains("step 3"), "{e}");
    assert_eq!(read(dir.join("out/adapter/adapter_model.safetensors")), adapter3);

    // --resume with a changed hyper-parameter names the key and both values.
    let o = train(dir, &["--resume", "--set", "lora_r=4"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("lora_r = 2") && e.contains("lora_r = 4"), "{e}");
    // … and so does changed data, even under the same file name.
    let original_data = read(dir.join("train.jsonl"));
    std::fs::write(dir.join("train.jsonl"), "{\"text\": \"something else entirely\"}\n").unwrap();
    let o = train(dir, &["--resume"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("training examples differ"), "{e}");
    std::fs::write(dir.join("train.jsonl"), original_data).unwrap();

    // --resume of the finished run with its own plan says so and writes the same adapter.
    let o = train(dir, &["--resume"]);
    assert!(o.status.success() && stderr(&o).contains("already finished at step 3"), "{}", stderr(&o));
    assert_eq!(read(dir.join("out/adapter/adapter_model.safetensors")), adapter3);

    // --overwrite starts again: the old checkpoints go, the user's file stays.
    let o = train(dir, &["--overwrite", "--set", "max_steps=1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("removed the earlier run's"), "{}", stderr(&o));
    assert!(!dir.join("out/checkpoints/step-3").exists() && dir.join("out/checkpoints/step-1").is_dir());
    assert_eq!(losses(&dir.join("out")).len(), 1);
    assert_eq!(read(dir.join("out/notes.txt")), b"mine");
    let o = train(dir, &["--overwrite", "--resume"]);
    assert!(!o.status.success() && stderr(&o).contains("not both"), "{}", stderr(&o));

    // Leftovers of an interrupted write are removed on the next start, with a note.
    std::fs::write(dir.join("out/.metrics.jsonl.tmp-4242"), "torn").unwrap();
    std::fs::create_dir_all(dir.join("out/checkpoints/.step-2.partial-4242")).unwrap();
    let o = train(dir, &["--resume", "--set", "max_steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(".metrics.jsonl.tmp-4242") && e.contains(".step-2.partial-4242") && e.contains("resuming from"), "{e}");
    assert!(!dir.join("out/.metrics.jsonl.tmp-4242").exists() && !dir.join("out/checkpoints/.step-2.partial-4242").exists());

    // output_dir that is a file.
    std::fs::write(dir.join("file-out"), "x").unwrap();
    let o = train(dir, &["--set", "output_dir=file-out"]);
    assert!(!o.status.success() && stderr(&o).contains("file-out is a file"), "{}", stderr(&o));
}

/// Starts a training run in the background, stderr to `log`.
fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Child {
    let mut c = bin();
    c.arg("train").arg("run.toml").args(args).current_dir(dir).stdout(Stdio::null());
    c.stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn one_run_per_folder_and_ctrl_c_leaves_a_resumable_checkpoint() {
    // A run far longer than the test, so the signal always lands mid-run; with a constant
    // learning rate its first steps are those of a shorter run of the same plan.
    const PLAN: &str = "max_steps = 1000000\nsave_steps = 1000000\nlr_scheduler = \"constant\"";
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir, PLAN);
    let log = dir.join("first.log");
    let mut first = spawn(dir, &[], &[], &log);
    wait_for("the first steps", || steps_logged(&dir.join("out")) >= 2);

    // A second run into the same folder is refused, naming the owner.
    let o = train(dir, &["--resume"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("in use by another ferrotune run") && e.contains(&first.id().to_string()), "{e}");

    // SIGINT: the step finishes, a checkpoint is written and named, the exit code is 130.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    let status = first.wait().unwrap();
    let e = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{e}");
    assert!(e.contains("SIGINT") && e.contains("checkpoint written to") && e.contains("--resume"), "{e}");
    let ck = ferrotune::train::checkpoint::latest(&dir.join("out")).expect("a checkpoint");
    let stopped_at: usize = ck.file_name().unwrap().to_str().unwrap()["step-".len()..].parse().unwrap();
    assert!(stopped_at >= 2, "{stopped_at}");
    assert!(!dir.join("out").join(ferrotune::train::run_dir::LOCK_FILE).exists(), "the lock is released");

    // Resuming (to an end 3 steps on) reproduces an uninterrupted run exactly.
    let end = format!("max_steps={}", stopped_at + 3);
    let o = train(dir, &["--resume", "--set", &end]);
    assert!(o.status.success() && stderr(&o).contains(&format!("resuming from {}", Path::new("out/checkpoints").join(format!("step-{stopped_at}")).display())), "{}", stderr(&o));
    let reference = tempfile::tempdir().unwrap();
    setup(reference.path(), PLAN);
    let o = train(reference.path(), &["--set", &end]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(dir.join("out/adapter/adapter_model.safetensors")), read(reference.path().join("out/adapter/adapter_model.safetensors")));
    assert_eq!(losses(&dir.join("out")), losses(&reference.path().join("out")));

    // SIGTERM behaves the same, with the exit code 143.
    let d2 = tempfile::tempdir().unwrap();
    setup(d2.path(), PLAN);
    let log2 = d2.path().join("t.log");
    let mut run = spawn(d2.path(), &[], &[], &log2);
    wait_for("a first step", || steps_logged(&d2.path().join("out")) >= 1);
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let status = run.wait().unwrap();
    let e = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(status.code(), Some(143), "{e}");
    assert!(e.contains("SIGTERM") && e.contains("checkpoint written to"), "{e}");
}

#[test]
fn ctrl_c_during_the_first_evaluation_stops_without_waiting_for_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    setup(dir, "max_steps = 5\nval_set = { path = \"val.jsonl\" }");
    // A validation set whose evaluation takes far longer than the test waits.
    let val: Vec<String> = (0..60000).map(|i| serde_json::json!({"prompt": format!("Q{i}: {i} plus {i}?\n"), "completion": format!("{}", 2 * i)}).to_string()).collect();
    write_lines(&dir.join("val.jsonl"), &val);
    let log = dir.join("log");
    let mut run = spawn(dir, &[], &[], &log);
    wait_for("the plan to be written", || dir.join("out/run.json").exists());
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    let status = run.wait().unwrap();
    let e = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{e}");
    assert!(e.contains("stopped before step 1 of 5, with nothing new to save"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "stopped {:?} after the signal", t.elapsed());
    assert_eq!(steps_logged(&dir.join("out")), 0);
}

/// kill -9 at 20+ instants, each followed by `--resume` (repeated until the run finishes):
/// the final adapter and the logged losses must equal an uninterrupted run's, bit for bit.
#[test]
fn kill_9_anywhere_then_resume_gives_the_uninterrupted_result() {
    const PLAN: &str = "max_steps = 8\nsave_steps = 2";
    let reference = tempfile::tempdir().unwrap();
    setup(reference.path(), PLAN);
    let t0 = Instant::now();
    let o = train(reference.path(), &[]);
    let run_time = t0.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let want_adapter = read(reference.path().join("out/adapter/adapter_model.safetensors"));
    let want_config = read(reference.path().join("out/adapter/adapter_config.json"));
    let want_losses = losses(&reference.path().join("out"));

    // Exact points: every step, every checkpoint write, the final adapter's write.
    let mut kills: Vec<(String, Option<Duration>)> = Vec::new();
    kills.extend((1..=8).map(|k| (format!("step:{k}"), None)));
    kills.extend((1..=4).map(|k| (format!("checkpoint:{k}"), None)));
    kills.push(("adapter:1".into(), None));
    // And random instants over the whole run, start-up and model load included.
    let mut rng = ferrotune::rng::SplitMix64::new(2026);
    kills.extend((0..10).map(|i| (format!("timer {i}"), Some(run_time.mul_f32(rng.next_f32())))));
    assert!(kills.len() >= 20);

    let mut killed = 0;
    for (what, delay) in &kills {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        setup(dir, PLAN);
        let log = dir.join("killed.log");
        let status = match delay {
            None => spawn(dir, &[], &[("FERROTUNE_KILL_AT", what)], &log).wait().unwrap(),
            Some(delay) => {
                let mut child = spawn(dir, &[], &[], &log);
                std::thread::sleep(*delay);
                let _ = child.kill();
                child.wait().unwrap()
            }
        };
        if !status.success() {
            killed += 1;
        }
        let o = train(dir, &["--resume"]);
        assert!(o.status.success(), "{what}: resume failed: {}", stderr(&o));
        let out = dir.join("out");
        assert_eq!(read(out.join("adapter/adapter_model.safetensors")), want_adapter, "{what}: adapter differs");
        assert_eq!(read(out.join("adapter/adapter_config.json")), want_config, "{what}: adapter config differs");
        assert_eq!(losses(&out), want_losses, "{what}: logged losses differ");
        let leftovers: Vec<PathBuf> = [out.clone(), out.join("checkpoints"), out.join("adapter")]
            .iter()
            .flat_map(|p| std::fs::read_dir(p).unwrap().flatten().map(|e| e.path()))
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{what}: {leftovers:?}");
    }
    eprintln!("{} kill points, {killed} runs actually killed, all resumed to identical adapters", kills.len());
    assert!(killed >= 13, "every exact kill point must have killed its run ({killed})");
}
