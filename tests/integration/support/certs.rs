//! Certificates made with the `openssl` CLI in a temporary directory: a
//! test CA, a second unrelated CA, a server certificate for 127.0.0.1 and
//! localhost and a client certificate, both signed by the first CA.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::unique;

/// The files are named as `scripts/rabbit-cluster.sh --tls DIR` expects
/// them: `ca.crt`, `server.crt`, `server.key` (and `client.crt`, `client.key`).
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
    pub client_crt: PathBuf,
    pub client_key: PathBuf,
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
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("outboxd-certs"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = Self::ca(&dir, "ca");
        let other_ca = Self::ca(&dir, "other");
        let (server_crt, server_key) = Self::signed(
            &dir,
            &ca,
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        );
        let (client_crt, client_key) = Self::signed(
            &dir,
            &ca,
            "client",
            "/CN=outboxd test client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        );
        Self {
            dir,
            ca,
            other_ca,
            server_crt,
            server_key,
            client_crt,
            client_key,
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

    /// A key and a certificate `name`.crt signed by `ca`, with extensions `ext`.
    fn signed(dir: &Path, ca: &Path, name: &str, subject: &str, ext: &str) -> (PathBuf, PathBuf) {
        let p = |suffix: &str| dir.join(format!("{name}.{suffix}"));
        let (key, csr, crt, extfile) = (p("key"), p("csr"), p("crt"), p("ext"));
        std::fs::write(&extfile, ext).expect("extensions file");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            subject,
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
            s(ca),
            "-CAkey",
            s(&ca.with_extension("key")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            s(&extfile),
            "-out",
            s(&crt),
        ]);
        (crt, key)
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
