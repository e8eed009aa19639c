//! How long a silent session may keep what it holds.
//!
//! The listener's session holds the relay's partitions, and a batch's
//! transaction holds its rows and its partitions' batch locks. If the relay
//! goes silent, the server must end those sessions, or the other relays
//! can never take the partitions:
//!
//! - a network partition: TCP keepalives on both ends (the server's side
//!   set per session, since its default is the OS's two hours);
//! - a relay that is alive to TCP but not running (a paused VM, SIGSTOP,
//!   a process stuck in the kernel), or a path where keepalives do not
//!   reach (a TCP proxy in between): keepalives are answered, so only the
//!   server's own idle limits end the session. A batch's transaction may
//!   sit idle for [`batch_idle_limit`], the listener's session for
//!   [`listener_idle_limit`].

use std::time::Duration;

/// Keepalive probing: the first probe after this much silence,
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// then one per interval,
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// and the connection is dead after this many unanswered.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Keepalives on both ends of the connections `config` makes: ours on
/// the socket, the server's as startup options (so a session whose relay
/// vanished ends in seconds, not the OS's two hours).
pub fn keepalives(config: &mut tokio_postgres::Config) {
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES);
    add_options(config, &server_keepalive_options());
}

/// Appends `-c name=value` settings to the options the URL may already
/// carry (later ones win, so ours do).
pub fn add_options(config: &mut tokio_postgres::Config, settings: &str) {
    let options = match config.get_options() {
        Some(existing) => format!("{existing} {settings}"),
        None => settings.to_owned(),
    };
    config.options(&options);
}

/// The server's side, as `-c` startup options (ignored on Unix sockets).
fn server_keepalive_options() -> String {
    format!(
        "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}",
        KEEPALIVE_IDLE.as_secs(),
        KEEPALIVE_INTERVAL.as_secs(),
        KEEPALIVE_RETRIES
    )
}

/// How long a batch's transaction may sit idle between its claim and its
/// settlement before the server ends it. In between the relay publishes
/// (milliseconds, unless the broker blocks publishers) and waits for
/// confirms (at most `confirm_timeout`): twice that, plus ten seconds. A
/// batch that outlasts it (a broker that blocks publishers for longer)
/// fails to settle and its rows are sent again: duplicates, never a loss.
pub fn batch_idle_limit(confirm_timeout: Duration) -> Duration {
    confirm_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(10))
}

/// How long the listener's session may sit idle before the server ends it
/// (and with it the partitions it holds). A live relay rebalances on it
/// once per `poll_interval`: three of those, plus ten seconds, the same
/// margin the health check gives a relay loop.
pub fn listener_idle_limit(poll_interval: Duration) -> Duration {
    poll_interval
        .saturating_mul(3)
        .saturating_add(Duration::from_secs(10))
}

/// A duration as PostgreSQL's millisecond setting, capped at its maximum
/// (a setting of that size is as good as none).
pub fn as_setting_ms(d: Duration) -> u64 {
    d.as_millis().min(i32::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_room_for_a_live_relay_and_never_overflow() {
        assert_eq!(
            batch_idle_limit(Duration::from_secs(30)),
            Duration::from_secs(70)
        );
        assert_eq!(
            listener_idle_limit(Duration::from_secs(1)),
            Duration::from_secs(13)
        );
        assert_eq!(batch_idle_limit(Duration::MAX), Duration::MAX);
        assert_eq!(as_setting_ms(Duration::MAX), i32::MAX as u64);
        assert_eq!(as_setting_ms(Duration::from_secs(13)), 13_000);
    }

    #[test]
    fn server_options_name_the_three_keepalive_settings() {
        assert_eq!(
            server_keepalive_options(),
            "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
        );
    }

    #[test]
    fn keepalives_come_after_the_urls_own_options() {
        let mut config: tokio_postgres::Config = "postgres://u@h/db?options=-c%20search_path%3Dx"
            .parse()
            .unwrap();
        keepalives(&mut config);
        assert_eq!(
            config.get_options(),
            Some(
                "-c search_path=x -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 \
                 -c tcp_keepalives_count=3"
            )
        );
        assert_eq!(config.get_keepalives_idle(), KEEPALIVE_IDLE);
    }
}
