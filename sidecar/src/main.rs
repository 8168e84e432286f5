//! `patina` — parses the command line and hands off to `patina_sidecar::cli`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = patina_sidecar::cli::Cli::parse();
    match patina_sidecar::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patina: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
