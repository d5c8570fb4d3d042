//! Every method of the registry through the same contract checks (`common::contract`), plus
//! each method's defining property in its own test.

mod common;

use common::contract::{check_method, Promise};

#[test]
fn lora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

#[test]
fn rslora_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    check_method(d.path(), &Promise { adapter: "lora", extra: "use_rslora = true", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true });
}

#[test]
fn unknown_methods_and_foreign_keys_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let p = Promise { adapter: "lora", extra: "", mergeable: true, peft: true, gguf_lora: true, identity_at_init: true };
    common::contract::plan(d.path(), &p, 1);
    let load = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        ferrotune::config::TrainConfig::load(&d.path().join("run.toml"), &set).err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = load(&["adapter=qlora9"]);
    assert!(e.contains("`qlora9` is not a method") && e.contains("lora"), "{e}");
    let e = load(&["lora_rank=4"]);
    assert!(e.contains("lora_rank") && e.contains("unknown field"), "{e}");
}
