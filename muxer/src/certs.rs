//! Certificates and keys from PEM files, and the rustls server configuration serving them:
//! shared by the config's checks and TLS termination, and depending on neither.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::rustls;

/// A certificate chain and its key.
pub(crate) type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Where the self-signed key and certificate live under `state_dir`: `(key, cert)`.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("tls");
    (
        dir.join("self-signed-key.pem"),
        dir.join("self-signed-cert.pem"),
    )
}

/// The certificate chain at `cert` and the key at `key`, both PEM.
pub(crate) fn read_identity(cert: &Path, key: &Path) -> Result<Identity, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("{}: {error}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|error| format!("{}: {error}", key.display()))?;
    Ok((certs, key))
}

/// A rustls server configuration serving `certs` with `key`, HTTP/2 preferred over HTTP/1.1.
pub(crate) fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    #[cfg(not(feature = "aws-lc"))]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    #[cfg(feature = "aws-lc")]
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| format!("certificate and key: {error}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
