use crate::formats::safetensors::SaveDType;
use crate::io_util::{check_output_path, OutputKind};
use anyhow::anyhow;
use std::path::Path;

pub fn run(model: &Path, adapter: &Path, out: &Path, dtype: &str, overwrite: bool) -> anyhow::Result<()> {
    let dtype = SaveDType::parse(dtype).ok_or_else(|| anyhow!("--dtype `{dtype}`: expected f32, bf16 or f16"))?;
    check_output_path(out, OutputKind::Dir, overwrite)?;
    let mut session = crate::session::Session::load(model, Some(adapter))?;
    // A RoSTE adapter's quantisation plan travels with the merged weights it was trained for.
    let plan = crate::models::qat::read_plan(adapter)?;
    session.merge_adapter()?;
    crate::export::merged::write_hf_dir(&session, out, dtype)?;
    if let Some(plan) = plan {
        let text = serde_json::to_string_pretty(&plan)?;
        crate::io_util::write_atomic(&out.join(crate::models::qat::PLAN_FILE), text.as_bytes())?;
        crate::note!("the quantisation plan ({}) is in {}", crate::models::qat::PLAN_FILE, out.display());
    }
    crate::note!("merged model written to {}", out.display());
    Ok(())
}
