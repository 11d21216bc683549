//! The operator CLI `flotilla`: parses nothing itself, everything lives in the
//! `flotilla_cli` library so tests can drive it.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let code = flotilla_cli::run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )
    .await;
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
