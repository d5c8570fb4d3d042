use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ferrotune::cli::Cli::parse();
    match ferrotune::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            ferrotune::console::error(&format!("{e:#}"));
            // A run stopped by a signal exits as shells expect of one (130 for Ctrl-C).
            match e.chain().find_map(|c| c.downcast_ref::<ferrotune::Error>()) {
                Some(ferrotune::Error::Interrupted { signal, .. }) => std::process::ExitCode::from((128 + signal) as u8),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}
