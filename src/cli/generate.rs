use crate::decode::{generate, SamplingOptions};
use std::io::Write;
use std::path::Path;

pub fn run(model: &Path, adapter: Option<&Path>, prompt: &str, chat: bool, opts: &SamplingOptions) -> anyhow::Result<()> {
    opts.validate()?;
    let session = crate::session::Session::load(model, adapter)?;
    let mut stdout = std::io::stdout();
    generate(&session.model, &session.tokenizer, prompt, chat, opts, &mut |piece| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    println!();
    Ok(())
}
