//! TLS settings: sslmode and sslrootcert for sources, amqps:// for the broker.

use super::*;

#[test]
fn sslmode_comes_from_the_key_or_else_the_url() {
    use crate::tls::PgTls;
    let tls = |extra: &str, url_suffix: &str| {
        let text = MINIMAL
            .replace("/orders\"", &format!("/orders{url_suffix}\""))
            .replace("name = \"orders\"", &format!("name = \"orders\"\n{extra}"));
        load(&text).unwrap().sources[0].tls.clone()
    };
    // the default, like libpq's prefer, connects without TLS
    assert_eq!(tls("", ""), PgTls::Off);
    // the URL's sslmode is used when the key is absent
    assert_eq!(tls("", "?sslmode=require"), PgTls::Require);
    assert_eq!(tls("", "?sslmode=disable"), PgTls::Off);
    // the key and the URL may both say it, if they agree
    assert_eq!(
        tls("sslmode = \"require\"", "?sslmode=require"),
        PgTls::Require
    );
    // and must not disagree: the key used to win silently, so a URL's
    // require could be downgraded to no TLS by a key elsewhere (issue 8)
    let both = MINIMAL
        .replace("/orders\"", "/orders?sslmode=require\"")
        .replace(
            "name = \"orders\"",
            "name = \"orders\"\nsslmode = \"disable\"",
        );
    let msg = err(&both);
    assert!(
        msg.contains("source[0].sslmode")
            && msg.contains("differs from the database_url's sslmode"),
        "{msg}"
    );
    assert_eq!(
        tls("sslmode = \"verify-full\"", ""),
        PgTls::VerifyFull { ca_file: None }
    );
    // libpq's verify-full and sslrootcert in the URL, which tokio-postgres
    // does not know, become the source's TLS settings
    assert_eq!(
        tls("", "?sslmode=verify-full"),
        PgTls::VerifyFull { ca_file: None }
    );
    let root = MINIMAL.replace(
        "/orders\"",
        "/orders?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"",
    );
    let msg = err(&root);
    // an error about a value from the URL names the URL's key
    assert!(
        msg.contains("source[0].database_url") && msg.contains("/nonexistent/ca.pem"),
        "{msg}"
    );
}

#[test]
fn amqps_urls_always_get_tls_settings_and_amqp_urls_never() {
    use crate::tls::Trust;
    let dir = std::env::temp_dir().join(format!("outboxd-amqps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A CA certificate to load (nothing connects in this test).
    let ca = dir.join("ca.pem");
    let pem = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=outboxd unit test", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(pem.status.success());
    let ca = ca.display().to_string();
    let rabbit = |url: &str, extra: &str| {
        MINIMAL.replace(
            "url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
            &format!("url = {url:?}\n{extra}"),
        )
    };
    let tls = |url: &str, extra: &str| load(&rabbit(url, extra)).unwrap().rabbitmq.tls;

    // amqp:// has no TLS at all
    assert_eq!(tls("amqp://g:g@h/%2f", ""), None);
    // amqps:// without a CA file trusts the system's roots
    assert_eq!(
        tls("amqps://g:g@h/%2f", "").map(|t| t.trust),
        Some(Trust::SystemRoots)
    );
    // the scheme in capitals is still amqps
    assert_eq!(
        tls("AMQPS://g:g@h/%2f", "").map(|t| t.trust),
        Some(Trust::SystemRoots)
    );
    // a CA file replaces the system's roots
    let with_ca = load(&rabbit(
        "amqps://g:g@h/%2f",
        &format!("tls_ca_file = {ca:?}"),
    ))
    .unwrap();
    assert_eq!(
        with_ca.rabbitmq.tls.as_ref().map(|t| t.trust.clone()),
        Some(Trust::CaFile(ca.clone()))
    );
    assert_eq!(
        with_ca.rabbitmq.describe(),
        format!("h:5671// as g (TLS, certificate verified against {ca})")
    );
    // verification is off only when asked for by name, and then says so
    let insecure = load(&rabbit(
        "amqps://g:g@h/%2f",
        "tls_insecure_skip_verify = true",
    ))
    .unwrap();
    assert_eq!(
        insecure.rabbitmq.tls.as_ref().map(|t| t.trust.clone()),
        Some(Trust::Anyone)
    );
    assert!(insecure.rabbitmq.describe().contains("NOT verified"));

    let mistakes: [(&str, String, &str); 5] = [
        // TLS settings on a plain URL
        (
            "ca file on amqp://",
            rabbit("amqp://g:g@h/%2f", &format!("tls_ca_file = {ca:?}")),
            "rabbitmq.tls_ca_file: TLS settings need an amqps:// url",
        ),
        // skipping verification of a connection that has no TLS
        (
            "skip verify on amqp://",
            rabbit("amqp://g:g@h/%2f", "tls_insecure_skip_verify = true"),
            "rabbitmq.tls_insecure_skip_verify: TLS settings need an amqps:// url",
        ),
        // a CA file and no verification contradict each other
        (
            "ca file and skip verify",
            rabbit(
                "amqps://g:g@h/%2f",
                &format!("tls_ca_file = {ca:?}\ntls_insecure_skip_verify = true"),
            ),
            "rabbitmq.tls_insecure_skip_verify: tls_ca_file asks for verification",
        ),
        // a client certificate without its key
        (
            "cert without key",
            rabbit("amqps://g:g@h/%2f", &format!("tls_cert_file = {ca:?}")),
            "rabbitmq.tls_key_file: missing",
        ),
        // a key file that holds no key
        (
            "key file without a key",
            rabbit(
                "amqps://g:g@h/%2f",
                &format!("tls_cert_file = {ca:?}\ntls_key_file = {ca:?}"),
            ),
            "rabbitmq.tls_cert_file:",
        ),
    ];
    for (what, text, needle) in mistakes {
        let msg = err(&text);
        assert!(msg.contains(needle), "{what}: {needle:?} not in {msg:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
