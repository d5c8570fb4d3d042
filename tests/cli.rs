//! The `ferrotune` binary's command forms, on a tiny model: train (with --set), eval's JSON
//! last line, merge reproducing base+adapter, generate, inspect-data, and clean failures.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn ferrotune(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(cwd).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("some stdout")).expect("the last stdout line is JSON")
}

#[test]
fn train_eval_merge_generate_inspect() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    let chat: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("count to {i}")},
                {"role": "assistant", "content": format!("{}", (0..=i).map(|x| x.to_string()).collect::<Vec<_>>().join(" "))},
            ]})
            .to_string()
        })
        .collect();
    write_lines(&dir.join("chat.jsonl"), &chat);
    write_lines(&dir.join("text.jsonl"), &["{\"text\": \"one two three four\"}".into(), "{\"text\": \"five six\"}".into()]);
    std::fs::write(
        dir.join("run.toml"),
        "base_model = \"model\"\ndatasets = [{ path = \"chat.jsonl\", type = \"chat\" }]\nval_size = 2\nlora_r = 2\nlora_alpha = 4\nmax_steps = 2\nsequence_len = 256\noutput_dir = \"out\"\n",
    )
    .unwrap();

    let (ok, out, err) = ferrotune(&["train", "run.toml", "--set", "learning_rate=0.01", "--set", "micro_batch_size=2", "--set", "base_model_name=\"org/tiny-model\""], dir);
    assert!(ok, "train failed: {err}");
    let acfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(acfg["base_model_name_or_path"], "org/tiny-model", "the adapter records the base as the plan names it");
    let summary = last_json(&out);
    assert_eq!(summary["steps"], 2);
    assert!(dir.join("out/adapter/adapter_model.safetensors").is_file());
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out/run.json")).unwrap()).unwrap();
    assert_eq!(run["plan"]["learning_rate"], 0.01, "--set overrides reach the resolved plan");
    assert_eq!(run["plan"]["micro_batch_size"], 2);
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 3 && metrics.contains("\"grad_norm\""));

    let (ok, out, err) = ferrotune(&["eval", "--model", "model", "--adapter", "out/adapter", "--data", "text.jsonl"], dir);
    assert!(ok, "eval failed: {err}");
    let e = last_json(&out);
    // "one two three four" and "five six" in the tiny byte-level tokenizer: every predicted token counts.
    assert!(e["tokens"].as_u64().unwrap() > 4);
    let loss = e["loss"].as_f64().unwrap();
    assert!((e["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp());
    assert_eq!((e["add_eos"].as_bool(), e["sequence_len"].as_u64(), e["examples"].as_u64()), (Some(false), Some(2048), Some(2)), "plain eval says how it encoded");

    // `eval --run` scores the run's validation set as the run did, with its adapter (or none):
    // the run's own eval losses come back, which plain `eval` (no EOS, other truncation) need not.
    for extra in [&[][..], &["--base-only"][..]] {
        let (ok, out, err) = ferrotune(&[&["eval", "--run", "out"][..], extra].concat(), dir);
        assert!(ok, "eval --run {extra:?} failed: {err}");
        let j = last_json(&out);
        let (got, reported) = (j["loss"].as_f64().unwrap(), j["reported"].as_f64().unwrap());
        assert!((got - reported).abs() < 1e-6, "eval --run {extra:?}: {got} vs the run's {reported}");
        assert_eq!((j["examples"].as_u64(), j["add_eos"].as_bool()), (Some(2), Some(true)));
    }
    let (ok, _, err) = ferrotune(&["eval", "--run", "out", "--data", "text.jsonl"], dir);
    assert!(!ok && err.contains("--data"), "{err}");
    let (ok, _, err) = ferrotune(&["merge", "--model", "model", "--adapter", "out/adapter", "--out", "merged"], dir);
    assert!(ok, "merge failed: {err}");
    let (ok, out, _) = ferrotune(&["eval", "--model", "merged", "--data", "text.jsonl"], dir);
    assert!(ok);
    let merged_loss = last_json(&out)["loss"].as_f64().unwrap();
    assert!((merged_loss - loss).abs() < 1e-5, "merged {merged_loss} vs base+adapter {loss}");

    let (ok, tuned_text, err) = ferrotune(&["generate", "--model", "model", "--adapter", "out/adapter", "--chat", "--prompt", "count to 3", "--max-new-tokens", "5"], dir);
    assert!(ok, "generate failed: {err}");
    // EFT with the adapter folder as --tuned and no --small-base (the fine-tuning scale is
    // --model itself): at β = 1 the score is the tuned model's log-probabilities, at β = 0 the
    // base's, so greedy decoding repeats the plain runs.
    let (ok, base_text, _) = ferrotune(&["generate", "--model", "model", "--chat", "--prompt", "count to 3", "--max-new-tokens", "5"], dir);
    assert!(ok);
    for (beta, want) in [("1", &tuned_text), ("0", &base_text)] {
        let (ok, out, err) = ferrotune(&["generate", "--model", "model", "--tuned", "out/adapter", "--beta", beta, "--chat", "--prompt", "count to 3", "--max-new-tokens", "5"], dir);
        assert!(ok && err.contains("EFT: 3 models"), "EFT β = {beta} failed: {err}");
        assert_eq!(&out, want, "EFT at β = {beta}");
    }
    // Many prompts from a file, decoded together: each completion is what `generate --prompt`
    // gives alone (greedy); several samples per prompt when sampling.
    write_lines(&dir.join("prompts.jsonl"), &["{\"prompt\": \"count to 3\"}".into(), "{\"question\": \"count to 5\"}".into(), "{\"text\": \"one two\"}".into()]);
    let (ok, _, err) = ferrotune(&["generate", "--model", "model", "--adapter", "out/adapter", "--chat", "--data", "prompts.jsonl", "--out", "gen.jsonl", "--batch-size", "2", "--max-new-tokens", "5"], dir);
    assert!(ok, "generate --data failed: {err}");
    let gen: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("gen.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(gen.len(), 3);
    for (g, p) in gen.iter().zip(["count to 3", "count to 5", "one two"]) {
        let (ok, alone, _) = ferrotune(&["generate", "--model", "model", "--adapter", "out/adapter", "--chat", "--prompt", p, "--max-new-tokens", "5"], dir);
        assert!(ok);
        assert_eq!((g["prompt"].as_str(), g["completion"].as_str()), (Some(p), Some(alone.strip_suffix('\n').unwrap())), "{g}");
    }
    let (ok, _, err) = ferrotune(&["generate", "--model", "model", "--data", "prompts.jsonl", "--out", "gen3.jsonl", "--num-return-sequences", "3", "--temperature", "1", "--max-new-tokens", "4"], dir);
    assert!(ok, "{err}");
    let samples: Vec<(String, u64)> = std::fs::read_to_string(dir.join("gen3.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["prompt"].as_str().unwrap().to_string(), v["sample"].as_u64().unwrap()))
        .collect();
    assert_eq!(samples.len(), 9);
    assert_eq!(samples[..3].iter().map(|s| s.1).collect::<Vec<_>>(), [0, 1, 2]);
    let (ok, _, err) = ferrotune(&["generate", "--model", "model", "--prompt", "x", "--num-return-sequences", "2"], dir);
    assert!(!ok && err.contains("--temperature"), "{err}");
    // Models whose tokenizers differ are refused, naming the flag.
    copy_dir(&dir.join("model"), &dir.join("other"));
    let tj = dir.join("other/tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["a"].clone(), vocab["b"].clone());
    vocab.insert("a".into(), b);
    vocab.insert("b".into(), a);
    std::fs::write(&tj, t.to_string()).unwrap();
    let (ok, _, err) = ferrotune(&["generate", "--model", "model", "--tuned", "other", "--prompt", "ab"], dir);
    assert!(!ok && err.contains("--tuned") && err.contains("different tokenizers"), "{err}");
    let (ok, _, err) = ferrotune(&["generate", "--model", "model", "--cge", "--tuned", "out/adapter", "--tuned", "other", "--prompt", "ab"], dir);
    assert!(!ok && err.contains("CGE contrasts one fine-tuned model"), "{err}");

    // Task accuracy by generation on chat data: prompts end at the assistant turn.
    let (ok, out, err) = ferrotune(&["eval", "--model", "model", "--adapter", "out/adapter", "--data", "chat.jsonl", "--task", "exact-match", "--limit", "3", "--max-new-tokens", "4", "--predictions", "pred.jsonl"], dir);
    assert!(ok, "eval --task failed: {err}");
    let t = last_json(&out);
    assert_eq!((t["task"].as_str(), t["examples"].as_u64()), (Some("exact"), Some(3)));
    let preds = std::fs::read_to_string(dir.join("pred.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 3);
    let first: serde_json::Value = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    assert!(first["prompt"].as_str().unwrap().contains("count to 0") && first["reference"].as_str().unwrap().starts_with('0'), "{first}");
    let (ok, _, err) = ferrotune(&["eval", "--model", "model", "--data", "chat.jsonl", "--task", "regex"], dir);
    assert!(!ok && err.contains("--pattern"), "{err}");

    // The bench times a DPO step on pairs: twice the rows of the SFT step.
    for (objective, rows) in [("sft", 2), ("dpo", 4)] {
        let (ok, out, err) = ferrotune(&["bench", "--model", "model", "--batch", "2", "--seq", "8", "--warmup", "0", "--steps", "1", "--objective", objective], dir);
        assert!(ok, "bench --objective {objective} failed: {err}");
        let r = last_json(&out);
        assert_eq!((r["objective"].as_str(), r["rows"].as_u64()), (Some(objective), Some(rows)));
    }
    // … and MeZO's zeroth-order step; an unknown update is refused by flag.
    let (ok, out, err) = ferrotune(&["bench", "--model", "model", "--batch", "2", "--seq", "8", "--warmup", "0", "--steps", "1", "--optimizer", "mezo"], dir);
    assert!(ok, "bench --optimizer mezo failed: {err}");
    assert_eq!(last_json(&out)["optimizer"].as_str(), Some("mezo"));
    // … offloaded full-weight MeZO, which leaves no scratch file behind; offloading is for it alone.
    let (ok, out, err) = ferrotune(&["bench", "--model", "model", "--batch", "2", "--seq", "8", "--warmup", "0", "--steps", "2", "--method", "full", "--optimizer", "mezo", "--zo-offload"], dir);
    assert!(ok, "bench --zo-offload failed: {err}");
    let r = last_json(&out);
    assert_eq!((r["method"].as_str(), r["zo_offload"].as_bool()), (Some("full"), Some(true)));
    let (ok, _, err) = ferrotune(&["bench", "--model", "model", "--steps", "1", "--method", "lora", "--optimizer", "mezo", "--zo-offload"], dir);
    assert!(!ok && err.contains("--zo-offload") && err.contains("full"), "{err}");
    let (ok, _, err) = ferrotune(&["bench", "--model", "model", "--steps", "1", "--optimizer", "sgd"], dir);
    assert!(!ok && err.contains("--optimizer") && err.contains("mezo"), "{err}");

    let (ok, out, err) = ferrotune(&["inspect-data", "run.toml", "-n", "1"], dir);
    assert!(ok, "inspect-data failed: {err}");
    assert!(out.contains("[[") && out.contains("targets"), "non-target tokens are marked: {out}");

    // Failures are one clear line on stderr and a non-zero exit, not a panic.
    let (ok, _, err) = ferrotune(&["eval", "--model", "missing-dir", "--data", "text.jsonl"], dir);
    assert!(!ok && err.contains("missing-dir") && !err.contains("panicked"), "{err}");
    let (ok, _, err) = ferrotune(&["train", "run.toml", "--set", "lora_rank=3"], dir);
    assert!(!ok && err.contains("lora_rank") && !err.contains("panicked"), "{err}");
}

/// `--json-logs`: every stderr line is one JSON event, the steps and evaluations among them with
/// the values metrics.jsonl records; `--quiet`: nothing on stderr but warnings; errors in both.
#[test]
fn json_logs_and_quiet_modes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    write_tiny_hf(&dir.join("model"), &TinySpec::default());
    let texts: Vec<String> = (0..8).map(|i| serde_json::json!({ "text": format!("{i} and {} make {}", i + 1, 2 * i + 1) }).to_string()).collect();
    write_lines(&dir.join("data.jsonl"), &texts);
    std::fs::write(
        dir.join("run.toml"),
        "base_model = \"model\"\ndatasets = [{ path = \"data.jsonl\", type = \"text\" }]\nval_size = 2\nlora_r = 2\nmax_steps = 3\nlogging_steps = 1\nmicro_batch_size = 2\n",
    )
    .unwrap();

    let (ok, out, err) = ferrotune(&["train", "run.toml", "--json-logs", "--set", "output_dir=\"json\""], dir);
    assert!(ok, "train --json-logs failed: {err}");
    assert_eq!(last_json(&out)["steps"], 3, "the result stays on stdout");
    let events: Vec<serde_json::Value> = err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect();
    assert!(events.iter().all(|e| e["event"].is_string()), "{err}");
    let of = |kind: &str| events.iter().filter(|e| e["event"] == kind).collect::<Vec<_>>();
    assert!(of("note").iter().any(|e| e["message"].as_str().unwrap().starts_with("trainable params")), "{err}");
    let metrics: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("json/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps = of("step");
    assert_eq!(steps.len(), 3, "{err}");
    for (i, s) in steps.iter().enumerate() {
        let m = metrics.iter().find(|m| m["step"] == i + 1 && m.get("loss").is_some()).expect("the step is in metrics.jsonl");
        assert_eq!((s["step"].as_u64(), &s["loss"], &s["lr"]), (Some(i as u64 + 1), &m["loss"], &m["lr"]));
    }
    let evals = of("eval");
    assert_eq!(evals.iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 3], "{err}");
    let logged: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("eval_loss").is_some()).map(|m| &m["eval_loss"]).collect();
    assert_eq!(evals.iter().map(|e| &e["eval_loss"]).collect::<Vec<_>>(), logged);

    // A run that trains at lr 0 throughout: its warning is shown even under --quiet, and nothing else.
    let (ok, out, err) = ferrotune(&["-q", "train", "run.toml", "--set", "output_dir=\"quiet\"", "--set", "warmup_steps=5"], dir);
    assert!(ok, "train --quiet failed: {err}");
    assert_eq!(last_json(&out)["steps"], 3);
    assert!(err.starts_with("warning: warmup_steps = 5") && err.lines().count() == 1, "--quiet printed more than the warning:\n{err}");

    let (ok, _, err) = ferrotune(&["eval", "--quiet", "--model", "model", "--data", "data.jsonl"], dir);
    assert!(ok && err.is_empty(), "eval --quiet printed: {err}");
    let (ok, _, err) = ferrotune(&["eval", "--json-logs", "--model", "missing-dir", "--data", "data.jsonl"], dir);
    let last: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).expect("the error is a JSON line");
    assert!(!ok && last["event"] == "error" && last["message"].as_str().unwrap().contains("missing-dir"), "{err}");
    let (ok, _, err) = ferrotune(&["eval", "--quiet", "--json-logs", "--model", "model", "--data", "data.jsonl"], dir);
    assert!(!ok && err.contains("--quiet") && err.contains("--json-logs"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every argument of every command says what it is in `--help` (clap's command tree walked).
#[test]
fn every_argument_has_help_text() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                missing.push(format!("{path} --{id}"));
            }
        }
        if cmd.get_about().is_none() && !path.is_empty() {
            missing.push(format!("{path} (the command itself)"));
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &format!("{path} {}", sub.get_name()).trim().to_string(), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&ferrotune::cli::Cli::command(), "", &mut missing);
    assert!(missing.is_empty(), "arguments without help text:\n  {}", missing.join("\n  "));
}
