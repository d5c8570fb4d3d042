use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ferrotune::cli::Cli::parse();
    match ferrotune::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
