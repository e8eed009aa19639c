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

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
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

/// Reads every certificate of a PEM file (a CA bundle).
pub fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if !Path::new(path).is_file() {
        return Err(format!("{path:?} is not a readable file"));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path:?}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path:?} is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path:?} holds no certificate"));
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
pub fn client_config(mode: &PgTls) -> Result<Option<ClientConfig>, String> {
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
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match trust {
        Trust::Anyone => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))),
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{path:?}: unusable certificate: {e}"))?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::SystemRoots => {
            let native = rustls_native_certs_roots();
            if native.is_empty() {
                return Err(
                    "no system root certificates found; name a CA file (sslrootcert, tls_ca_file)"
                        .to_owned(),
                );
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
                .map_err(|e| format!("{cert:?} and its key cannot be used: {e}"))
        }
    }
}

/// Reads a private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    if !Path::new(path).is_file() {
        return Err(format!("{path:?} is not a readable file"));
    }
    // The error text of a PEM parse names no key material.
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{path:?} holds no usable key: {e}"))
}

fn rustls_native_certs_roots() -> Vec<CertificateDer<'static>> {
    // Unreadable entries are skipped; an empty store is reported above.
    rustls_native_certs::load_native_certs().certs
}

/// The tokio-postgres connector for a mode.
pub fn pg_connector(mode: &PgTls) -> Result<Option<MakeRustlsConnect>, String> {
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
