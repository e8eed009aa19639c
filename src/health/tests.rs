use std::net::SocketAddr;

use tokio::net::TcpListener;

use super::*;

#[test]
fn urls_name_the_relays_metrics_address_only() {
    let ok = |s: &str| s.parse::<HealthUrl>().map(|u| u.to_string());
    // the default, and the form `metrics.listen` gives
    assert_eq!(
        ok("http://127.0.0.1:9187"),
        Ok("http://127.0.0.1:9187/healthz".into())
    );
    // a trailing slash is the same address
    assert_eq!(
        ok("http://localhost:9187/"),
        Ok("http://localhost:9187/healthz".into())
    );
    // IPv6 in brackets, kept in brackets for the Host header
    assert_eq!(
        ok("http://[::1]:9187"),
        Ok("http://[::1]:9187/healthz".into())
    );
    // no port: HTTP's own
    assert_eq!(
        ok("http://relay.local"),
        Ok("http://relay.local:80/healthz".into())
    );
    for (bad, why) in [
        ("https://127.0.0.1:9187", "no TLS on the metrics port"),
        ("127.0.0.1:9187", "no scheme"),
        (
            "http://127.0.0.1:9187/healthz",
            "a path: /healthz is appended",
        ),
        ("http://127.0.0.1:9187?x=1", "a query"),
        ("http://user@127.0.0.1:9187", "credentials"),
        ("http://:9187", "no host"),
        ("http://127.0.0.1:99999", "a port out of range"),
        ("http://127.0.0.1:", "an empty port"),
        ("http://[::1:9187", "an unclosed bracket"),
    ] {
        assert!(ok(bad).is_err(), "{bad} ({why}) was accepted");
    }
}

#[test]
fn answers_are_read_from_their_status_line() {
    for (answer, expected) in [
        // the relay's healthy answer
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
            Some((200, "ok")),
        ),
        // a stuck loop: the body names it
        (
            "HTTP/1.1 503 Service Unavailable\r\n\r\nrelay loop stuck: orders\n",
            Some((503, "relay loop stuck: orders")),
        ),
        // HTTP/1.0 and a status line without a reason phrase
        ("HTTP/1.0 404\r\n\r\n", Some((404, ""))),
        // headers cut off by the size limit: the status is still known
        ("HTTP/1.1 200 OK\r\nx-long: aaaa", Some((200, ""))),
        // not HTTP at all
        ("SSH-2.0-OpenSSH_9.2\r\n", None),
        ("", None),
        ("HTTP/1.1 2000 OK\r\n\r\n", None),
    ] {
        assert_eq!(
            parse_answer(answer.as_bytes()),
            expected.map(|(s, b)| (s, b.to_owned())),
            "{answer:?}"
        );
    }
}

/// A one-shot server on a free loopback port that reads the request and
/// sends `answer` (or nothing, holding the connection, if it is `None`).
async fn serve_once(answer: Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&request).into_owned();
        assert!(text.starts_with("GET /healthz HTTP/1.1\r\n"), "{text}");
        assert!(text.contains(&format!("Host: {addr}\r\n")), "{text}");
        match answer {
            Some(a) => {
                let _ = conn.write_all(a.as_bytes()).await;
            }
            None => {
                // hold the connection open without a word until the client gives up
                let _ = conn.read(&mut buf).await;
            }
        }
    });
    addr
}

fn url(addr: SocketAddr) -> HealthUrl {
    format!("http://{addr}").parse().expect("a valid test URL")
}

#[tokio::test]
async fn a_200_is_healthy() {
    let addr = serve_once(Some("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")).await;
    check(&url(addr)).await.expect("healthy");
}

#[tokio::test]
async fn a_503_is_unhealthy_and_says_what_the_relay_said() {
    let addr = serve_once(Some(
        "HTTP/1.1 503 Service Unavailable\r\n\r\nrelay loop stuck: orders\n",
    ))
    .await;
    let err = check(&url(addr)).await.expect_err("unhealthy");
    assert!(
        matches!(err, HealthError::Unhealthy { status: 503, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("http://{addr}/healthz answered 503: relay loop stuck: orders")
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let addr = serve_once(None).await;
    let err = check_within(&url(addr), Duration::from_millis(200))
        .await
        .expect_err("no answer");
    assert!(matches!(err, HealthError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn something_else_than_http_is_unhealthy() {
    let addr = serve_once(Some("SSH-2.0-OpenSSH_9.2\r\n")).await;
    let err = check(&url(addr)).await.expect_err("not HTTP");
    assert!(matches!(err, HealthError::NotHttp { .. }), "{err:?}");
}

#[tokio::test]
async fn a_closed_port_cannot_be_connected() {
    // Bound then dropped: nothing listens there any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    let err = check(&url(addr)).await.expect_err("closed port");
    assert!(matches!(err, HealthError::Connect { .. }), "{err:?}");
}
