//! TLS, for PostgreSQL and for RabbitMQ, on rustls with the ring provider
//! (the only crypto provider in the build; it is passed explicitly, so no
//! process-wide default has to be installed).
//!
//! PostgreSQL modes follow libpq's names, with one difference stated in the
//! README: `prefer` connects without TLS (a verifying connector cannot fall
//! back to plain text, and a non-verifying one would give a false sense of
//! safety). `require` encrypts without checking the server's certificate;
//! `verify-full` checks it against `sslrootcert` (or the system's roots)
//! and checks the host name.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a source talks to its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// Plain TCP (`sslmode` disable or prefer).
    Off,
    /// Encrypted, server certificate not checked.
    Require,
    /// Encrypted, certificate chain and host name checked; `None` uses the
    /// system's root certificates.
    VerifyFull { ca_file: Option<String> },
}

impl PgTls {
    pub fn name(&self) -> &'static str {
        match self {
            PgTls::Off => "disable",
            PgTls::Require => "require",
            PgTls::VerifyFull { .. } => "verify-full",
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS client config cannot be built. Messages name files, never
/// their content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Missing, or not readable by this process.
    #[error("{path:?} is not a readable file: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A directory, a device, a socket.
    #[error("{path:?} is not a readable file: not a regular file")]
    NotAFile { path: String },
    #[error("{path:?} is not PEM certificates: {source}")]
    NotPem {
        path: String,
        #[source]
        source: pem::Error,
    },
    #[error("{path:?} holds no certificate")]
    NoCertificate { path: String },
    /// rustls refused a CA certificate of the file.
    #[error("{path:?}: unusable certificate: {source}")]
    UnusableCertificate {
        path: String,
        // Boxed, as below: a rustls::Error is 64 bytes, and this error
        // travels inside the connect, migrate and dead-letter errors.
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("no system root certificates found; name a CA file (sslrootcert, tls_ca_file)")]
    NoSystemRoots,
    // The error text of a PEM parse names no key material.
    #[error("{path:?} holds no usable key: {source}")]
    NoKey {
        path: String,
        #[source]
        source: pem::Error,
    },
    /// The client certificate and its key do not go together (or rustls
    /// refuses one of them).
    #[error("{cert:?} and its key cannot be used: {source}")]
    ClientAuth {
        cert: String,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("TLS setup failed: {0}")]
    Setup(#[source] Box<rustls::Error>),
}

/// `Ok` if `path` is a regular file (readable or not: opening it says that).
fn regular_file(path: &str) -> Result<(), TlsError> {
    let path = path.to_owned();
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(TlsError::NotAFile { path }),
        Err(source) => Err(TlsError::Unreadable { path, source }),
    }
}

/// A PEM error from opening the file is the file's problem, not its content's.
fn opening(
    path: &str,
    other: impl FnOnce(pem::Error) -> TlsError,
) -> impl FnOnce(pem::Error) -> TlsError {
    move |e| match e {
        pem::Error::Io(source) => TlsError::Unreadable {
            path: path.to_owned(),
            source,
        },
        e => other(e),
    }
}

/// Reads every certificate of a PEM file (a CA bundle).
pub fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    regular_file(path)?;
    let not_pem = |source| TlsError::NotPem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(opening(path, not_pem))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(not_pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Whose certificates a TLS client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The chain must end at a certificate of this PEM file (and only
    /// there: the system's roots are not added), and name the host.
    CaFile(String),
    /// The chain must end at one of the system's root certificates, and
    /// name the host.
    SystemRoots,
    /// Anything goes (signatures are still checked): encryption without
    /// authentication.
    Anyone,
}

impl Trust {
    /// What a successful handshake proved, for `check` and the logs.
    pub fn describe(&self) -> String {
        match self {
            Trust::CaFile(path) => format!("certificate verified against {path}"),
            Trust::SystemRoots => {
                "certificate verified against the system's root certificates".to_owned()
            }
            Trust::Anyone => "certificate NOT verified".to_owned(),
        }
    }
}

/// The rustls client config for a mode (`None` for plain TCP).
pub fn client_config(mode: &PgTls) -> Result<Option<ClientConfig>, TlsError> {
    let trust = match mode {
        PgTls::Off => return Ok(None),
        PgTls::Require => Trust::Anyone,
        PgTls::VerifyFull {
            ca_file: Some(path),
        } => Trust::CaFile(path.clone()),
        PgTls::VerifyFull { ca_file: None } => Trust::SystemRoots,
    };
    tls_client_config(&trust, None).map(Some)
}

/// A rustls client config on the ring provider, trusting `trust`, with an
/// optional client certificate and key (PEM files) for mutual TLS.
pub fn tls_client_config(
    trust: &Trust,
    client_auth: Option<(&str, &str)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(Box::new(e)))?;
    let builder = match trust {
        Trust::Anyone => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))),
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::UnusableCertificate {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::SystemRoots => {
            let native = rustls_native_certs_roots();
            if native.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(native);
            builder.with_root_certificates(roots)
        }
    };
    match client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::ClientAuth {
                    cert: cert.to_owned(),
                    source: Box::new(e),
                })
        }
    }
}

/// Reads a private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    regular_file(path)?;
    let no_key = |source| TlsError::NoKey {
        path: path.to_owned(),
        source,
    };
    PrivateKeyDer::from_pem_file(path).map_err(opening(path, no_key))
}

fn rustls_native_certs_roots() -> Vec<CertificateDer<'static>> {
    // Unreadable entries are skipped; an empty store is reported above.
    rustls_native_certs::load_native_certs().certs
}

/// The tokio-postgres connector for a mode.
pub fn pg_connector(mode: &PgTls) -> Result<Option<MakeRustlsConnect>, TlsError> {
    Ok(client_config(mode)?.map(MakeRustlsConnect::new))
}

/// `sslmode=require` and `tls_insecure_skip_verify`: encryption without
/// authentication, as in libpq's `require`.
/// Signatures are still checked, so the session is bound to the key the
/// server presented; who that server is, is not.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn scratch(name: &str, content: &str) -> String {
        let dir = std::env::temp_dir().join(format!("outboxd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    #[test]
    fn a_missing_file_keeps_the_io_error_as_its_cause() {
        let err = read_certs("/nonexistent/ca.pem").unwrap_err();
        let TlsError::Unreadable { source, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        let msg = err.to_string();
        assert!(
            msg.starts_with(r#""/nonexistent/ca.pem" is not a readable file: "#),
            "{msg}"
        );
        assert!(err.source().is_some());
        assert!(matches!(
            read_key("/nonexistent/key.pem"),
            Err(TlsError::Unreadable { .. })
        ));
    }

    #[test]
    fn files_without_what_they_should_hold_are_named() {
        let dir = std::env::temp_dir().display().to_string();
        assert!(matches!(read_certs(&dir), Err(TlsError::NotAFile { .. })));
        let empty = scratch("empty.pem", "");
        let err = read_certs(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        let err = read_key(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoKey { .. }), "{err:?}");
        assert!(err.to_string().contains("holds no usable key"), "{err}");
        let torn = scratch("torn.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
        let err = read_certs(&torn).unwrap_err();
        assert!(matches!(err, TlsError::NotPem { .. }), "{err:?}");
        assert!(err.source().is_some());
        let scratch_dir = std::path::Path::new(&empty).parent().unwrap();
        std::fs::remove_dir_all(scratch_dir).unwrap();
    }
}
