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
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
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

/// The rustls client config for a mode (`None` for plain TCP).
pub fn client_config(mode: &PgTls) -> Result<Option<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let config = match mode {
        PgTls::Off => return Ok(None),
        PgTls::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth(),
        PgTls::VerifyFull { ca_file } => {
            let mut roots = RootCertStore::empty();
            match ca_file {
                Some(path) => {
                    for cert in read_certs(path)? {
                        roots
                            .add(cert)
                            .map_err(|e| format!("{path:?}: unusable certificate: {e}"))?;
                    }
                }
                None => {
                    let native = rustls_native_certs_roots();
                    if native.is_empty() {
                        return Err("no system root certificates found; set sslrootcert".to_owned());
                    }
                    roots.add_parsable_certificates(native);
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(config))
}

fn rustls_native_certs_roots() -> Vec<CertificateDer<'static>> {
    // Unreadable entries are skipped; an empty store is reported above.
    rustls_native_certs::load_native_certs().certs
}

/// The tokio-postgres connector for a mode.
pub fn pg_connector(mode: &PgTls) -> Result<Option<MakeRustlsConnect>, String> {
    Ok(client_config(mode)?.map(MakeRustlsConnect::new))
}

/// `sslmode=require`: encryption without authentication, as in libpq.
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
