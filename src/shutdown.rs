//! Signals, in one place. The first SIGTERM or SIGINT starts a drain; a
//! second one exits at once. The handlers are installed before anything
//! else runs, because as PID 1 in a container an unhandled SIGTERM is
//! simply ignored.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code after a second signal: rows in flight stay in the outbox.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Installs the handlers and returns the token the first signal cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let drain = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "shutdown requested; draining (send it again to exit at once)"
        );
        drain.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!(
            signal = name,
            "second signal; exiting now, in-flight rows stay in the outbox"
        );
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(token)
}
