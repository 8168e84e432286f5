//! `patina` — parses the command line and hands off to `patina_sidecar::cli`.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = patina_sidecar::cli::Cli::parse();
    match patina_sidecar::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patina: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// before it already contains. Our error types print their cause inside their own message
/// (so a log line says everything) and also expose it as `source()`; printing both gave
/// "Address already in use (os error 98): Address already in use (os error 98)".
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.is_empty() && last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}
