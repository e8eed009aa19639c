//! TLS against peers that do not play along: `amqps://` pointed at a plain
//! AMQP port, a TLS broker whose certificate comes from the right or the
//! wrong CA, and a PostgreSQL that refuses TLS. The shared services are
//! never reconfigured: a TLS-terminating proxy written here stands in for
//! a broker with a TLS listener, and a fake PostgreSQL answers the
//! SSLRequest itself. Certificates come from the `openssl` CLI.

mod amqps;
mod postgres;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::relay::run_to_end;
use crate::support::unique;

const LONG: Duration = Duration::from_secs(30);

/// A temporary directory with a test CA, a second unrelated CA, and a
/// server certificate for 127.0.0.1 and localhost signed by the first.
pub struct Certs {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("outboxd-tlspeers"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = Self::ca(&dir, "ca");
        let other_ca = Self::ca(&dir, "other");
        let p = |name: &str| dir.join(name);
        let (key, csr, crt, ext) = (
            p("server.key"),
            p("server.csr"),
            p("server.crt"),
            p("san.ext"),
        );
        std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("san.ext");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&ca),
            "-CAkey",
            s(&ca.with_extension("key")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            s(&ext),
            "-out",
            s(&crt),
        ]);
        Self {
            dir,
            ca,
            other_ca,
            server_crt: crt,
            server_key: key,
        }
    }

    fn ca(dir: &Path, name: &str) -> PathBuf {
        let crt = dir.join(format!("{name}.crt"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=outboxd test {name}"),
            "-keyout",
            s(&dir.join(format!("{name}.key"))),
            "-out",
            s(&crt),
        ]);
        crt
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn check_blocking(cfg: String) -> tokio::task::JoinHandle<(Option<i32>, String, String)> {
    tokio::task::spawn_blocking(move || run_to_end(&["check"], &cfg))
}
