//! `outboxd health`: asks a running relay's `/healthz` and says whether it
//! answered 200, so that an image without a shell (distroless) can have a
//! Docker `HEALTHCHECK`. One HTTP/1.1 GET over a plain TCP connection: the
//! admin server speaks nothing else, and an HTTP client crate would be the
//! largest part of this binary's work here.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The relay's default metrics address (`metrics.listen`).
pub const DEFAULT_URL: &str = "http://127.0.0.1:9187";

/// The whole check (connect, request, answer) gets this long: a relay
/// whose HTTP server does not answer within it is not healthy.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes read of an answer: the status line and a short body are
/// all we look at (`/healthz` says which relay loop is stuck in its body).
const MAX_ANSWER: u64 = 4096;

/// Where the relay serves `/healthz`: `http://HOST:PORT`, the address of
/// `metrics.listen` (a host name, an IPv4 address or a bracketed IPv6 one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthUrl {
    host: String,
    port: u16,
}

impl HealthUrl {
    /// `host:port` as given (IPv6 in brackets), for the `Host` header.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for HealthUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}/healthz", self.authority())
    }
}

impl FromStr for HealthUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or("must start with http:// (the metrics endpoint has no TLS)")?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(
                "must be http://HOST:PORT with nothing after the port (/healthz is appended)"
                    .into(),
            );
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or("an unclosed [ in the host")?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("has an invalid port {p:?}"))?,
            None => 80,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// Why the relay is not healthy, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot connect to {url}")]
    Connect {
        url: HealthUrl,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {url} within {timeout:?}")]
    Timeout { url: HealthUrl, timeout: Duration },
    #[error("lost the connection to {url}")]
    Io {
        url: HealthUrl,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} did not answer with HTTP")]
    NotHttp { url: HealthUrl },
    #[error("{url} answered {status}: {body}")]
    Unhealthy {
        url: HealthUrl,
        status: u16,
        body: String,
    },
}

/// Asks `url` once; `Ok` when it answered 200 within [`TIMEOUT`].
pub async fn check(url: &HealthUrl) -> Result<(), HealthError> {
    check_within(url, TIMEOUT).await
}

pub async fn check_within(url: &HealthUrl, timeout: Duration) -> Result<(), HealthError> {
    let answer = tokio::time::timeout(timeout, ask(url))
        .await
        .map_err(|_| HealthError::Timeout {
            url: url.clone(),
            timeout,
        })??;
    let (status, body) =
        parse_answer(&answer).ok_or_else(|| HealthError::NotHttp { url: url.clone() })?;
    if status == 200 {
        Ok(())
    } else {
        Err(HealthError::Unhealthy {
            url: url.clone(),
            status,
            body,
        })
    }
}

/// Sends the GET and reads the answer until the server closes (at most
/// [`MAX_ANSWER`] bytes).
async fn ask(url: &HealthUrl) -> Result<Vec<u8>, HealthError> {
    let io = |source| HealthError::Io {
        url: url.clone(),
        source,
    };
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|source| HealthError::Connect {
            url: url.clone(),
            source,
        })?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nUser-Agent: outboxd-health\r\nConnection: close\r\n\r\n",
        url.authority()
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    Ok(answer)
}

/// The status code and the body (trimmed, at most one line's worth) of an
/// HTTP/1.x answer; `None` if it does not start with a status line.
fn parse_answer(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    let status = code.parse().ok()?;
    let body: String = body.trim().chars().take(200).collect();
    Some((status, body))
}

#[cfg(test)]
mod tests;
