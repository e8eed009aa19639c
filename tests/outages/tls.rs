//! TLS to PostgreSQL with a certificate the test makes: the server gets a
//! certificate from a test CA (ALTER SYSTEM + reload, put back afterwards);
//! `verify-full` with that CA works and really encrypts, `verify-full` with
//! another CA is refused with a clear error, `require` works without
//! checking.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::broker::TestBroker;
use crate::support::certs::Certs;
use crate::support::db::TestDb;
use crate::support::relay::{Relay, SourceSpec, config, run_to_end};
use crate::support::{AMQP_URL, eventually};
use crate::{LONG, service};

/// Puts PostgreSQL's own certificate back, even if the test fails.
struct ServerCertGuard;
impl Drop for ServerCertGuard {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "root",
                "-d",
                "postgres",
                "-c",
                "ALTER SYSTEM RESET ssl_cert_file",
                "-c",
                "ALTER SYSTEM RESET ssl_key_file",
                "-c",
                "SELECT pg_reload_conf()",
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_servers_ca_works_and_with_another_ca_is_refused() {
    let certs = Certs::new();
    let (dir, ca, other_ca) = (&certs.dir, &certs.ca, &certs.other_ca);
    let (crt, key) = (&certs.server_crt, &certs.server_key);
    // PostgreSQL reads them as its own user, and insists the key is private.
    service("chmod", &["755", dir.to_str().unwrap()]);
    service(
        "chown",
        &["postgres", crt.to_str().unwrap(), key.to_str().unwrap()],
    );
    service("chmod", &["600", key.to_str().unwrap()]);

    let db = TestDb::migrated("obx_tls").await;
    let guard = ServerCertGuard;
    // One statement per message: ALTER SYSTEM cannot run in a transaction.
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", crt.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        db.client.batch_execute(&sql).await.unwrap();
    }

    let mut broker = TestBroker::new("#").await;
    let exchange = broker.exchange.clone();
    let spec = |name: &str, mode: &str, root: Option<&Path>| {
        let mut s = SourceSpec::new(name, &db.url, &exchange).set("sslmode", &format!("{mode:?}"));
        if let Some(r) = root {
            s = s.set("sslrootcert", &format!("{:?}", r.display().to_string()));
        }
        s
    };

    // verify-full against the CA that signed the server's certificate.
    let good = config(AMQP_URL, &[spec("orders", "verify-full", Some(ca))]);
    // The reload is asynchronous: wait (bounded) until new sessions get the new certificate.
    let out = eventually("the new server certificate to be in use", LONG, || async {
        let (code, out, _) = run_to_end(&["check"], &good);
        (code == Some(0)).then_some(out)
    })
    .await;
    assert!(out.contains("(sslmode verify-full)"), "{out}");
    let relay = Relay::start(&good).await;
    db.insert_one("OrderCreated", "", "").await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("delivered over TLS");
    let encrypted: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'outboxd' AND datname = current_database() AND ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        encrypted >= 2,
        "the relay's connections use TLS ({encrypted})"
    );
    drop(relay);

    // verify-full against a CA that did not sign it: refused, clearly.
    let bad = config(AMQP_URL, &[spec("orders", "verify-full", Some(other_ca))]);
    let (code, out, _) = run_to_end(&["check"], &bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL source orders database") && out.to_lowercase().contains("certificate"),
        "{out}"
    );
    let relay = Relay::start(&bad).await;
    let (_, body) = eventually("the refusal in /readyz", LONG, || async {
        let (code, body) = relay.readyz().await;
        body["sources"][0]["last_error"]
            .is_string()
            .then_some((code, body))
    })
    .await;
    assert!(
        body["sources"][0]["last_error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{body}"
    );
    drop(relay);

    // require: encrypted, certificate not checked.
    let require = config(AMQP_URL, &[spec("orders", "require", None)]);
    let relay = Relay::start(&require).await;
    db.insert_one("OrderCreated", "", "").await;
    broker
        .next(Duration::from_secs(20))
        .await
        .expect("delivered with sslmode require");
    drop(relay);

    // capture = "wal": the replication connection is encrypted and checked too.
    let wal_db = TestDb::empty("obxw_tls").await;
    let wal = config(
        AMQP_URL,
        &[SourceSpec::new(&wal_db.name, &wal_db.url, &exchange)
            .set("capture", "\"wal\"")
            .set("sslmode", "\"verify-full\"")
            .set("sslrootcert", &format!("{:?}", ca.display().to_string()))],
    );
    let (code, _, err) = run_to_end(&["migrate"], &wal);
    assert_eq!(code, Some(0), "migrate over TLS: {err}");
    let relay = Relay::start(&wal).await;
    let walsender_ssl = || async {
        wal_db
            .client
            .query_opt(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = $1 AND a.backend_type = 'walsender'",
                &[&format!("outboxd {}", wal_db.name)],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, bool>(0))
    };
    let ssl = eventually("the relay's walsender", LONG, || async {
        walsender_ssl().await
    })
    .await;
    assert!(ssl, "the replication connection uses TLS");
    wal_db
        .client
        .batch_execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'w', 'OverTls', '{}')",
        )
        .await
        .unwrap();
    // (A duplicate of an earlier part's row may come first: at least once.)
    loop {
        let m = broker
            .next(Duration::from_secs(20))
            .await
            .expect("delivered from the log over TLS");
        if m.kind.as_deref() == Some("OverTls") {
            break;
        }
    }
    drop(relay);
    // verify-full against the other CA: the stream is refused, naming the certificate.
    let wal_bad = config(
        AMQP_URL,
        &[SourceSpec::new(&wal_db.name, &wal_db.url, &exchange)
            .set("capture", "\"wal\"")
            .set("sslmode", "\"verify-full\"")
            .set(
                "sslrootcert",
                &format!("{:?}", other_ca.display().to_string()),
            )],
    );
    let relay = Relay::start(&wal_bad).await;
    eventually("the refusal in /readyz", LONG, || async {
        let (_, body) = relay.readyz().await;
        let e = body["sources"][0]["last_error"].as_str()?.to_lowercase();
        (e.contains("certificate") || e.contains("unknownissuer") || e.contains("tls"))
            .then_some(())
    })
    .await;
    drop(relay);

    drop(guard);
    drop(certs);
}
