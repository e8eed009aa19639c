//! Signals, in one place. The first SIGTERM, SIGINT or SIGHUP starts a
//! drain; a second one of any of them exits at once. The handlers are
//! installed before anything else runs, because as PID 1 in a container an
//! unhandled SIGTERM is simply ignored.
//!
//! SIGHUP does not reload the config: it drains and exits like SIGTERM, and
//! says so, so that a supervisor restarts outboxd with the new config.
//! Without a handler its default action would kill the process mid-batch.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code after a second signal: rows in flight stay in the outbox.
pub const FORCED_EXIT_CODE: i32 = 130;

/// The signals that stop the relay.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Waits for the next one; returns its name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Installs the handlers and returns the token the first signal cancels.
pub fn install() -> std::io::Result<CancellationToken> {
    let mut signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    let token = CancellationToken::new();
    let drain = token.clone();
    tokio::spawn(async move {
        let name = signals.next().await;
        if name == "SIGHUP" {
            info!(
                signal = name,
                "configuration reload is not supported; draining and exiting, so that a supervisor restarts outboxd with the new config (send it again to exit at once)"
            );
        } else {
            info!(
                signal = name,
                "shutdown requested; draining (send it again to exit at once)"
            );
        }
        drain.cancel();
        let name = signals.next().await;
        warn!(
            signal = name,
            "second signal; exiting now, in-flight rows stay in the outbox"
        );
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(token)
}
