//! TLS for the server (rustls, X.509): the acceptor built from the PEM files the user
//! names, and the bridge that lets the transmission workers, which use a plain socket,
//! serve a TLS connection.

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::TlsAcceptor;

/// The acceptor for `--tls-cert`/`--tls-key`, and with `--tls-ca` one that requires a
/// client certificate signed by that CA.
pub fn acceptor(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(cert, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        anyhow::anyhow!(
            "--tls-key {}: no private key read ({e}); give the server's key as PEM (-----BEGIN PRIVATE KEY-----)",
            key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol version available")?;
    let builder = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca, "--tls-ca")? {
                roots
                    .add(c)
                    .with_context(|| format!("--tls-ca {}: not a CA certificate", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| {
                    format!("--tls-ca {}: cannot verify clients with it", ca.display())
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "--tls-cert {} and --tls-key do not make a usable pair (does the key belong to the certificate?)",
            cert.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path, option: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{option} {}: cannot read", path.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{option} {}: not a PEM file", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{option} {}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

/// Carries bytes between a TLS stream and `inner`, the plain end the workers do not see
/// (they use its pair): requests up, replies down. Ends when the workers close their end
/// (every reply is then sent and the TLS session closed); the client closing its side ends
/// only the way up, so the workers see the end of requests and finish their replies.
pub async fn pump<T>(tls: T, inner: tokio::net::UnixStream)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tls_rd, mut tls_wr) = tokio::io::split(tls);
    let (inner_rd, mut inner_wr) = inner.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut tls_rd, &mut inner_wr).await;
        let _ = inner_wr.shutdown().await;
    };
    let down = async move {
        let mut replies = BufReader::with_capacity(256 << 10, inner_rd);
        let _ = tokio::io::copy_buf(&mut replies, &mut tls_wr).await;
        let _ = tls_wr.shutdown().await;
    };
    tokio::pin!(up, down);
    let mut up_done = false;
    loop {
        tokio::select! {
            _ = &mut down => return,
            _ = &mut up, if !up_done => up_done = true,
        }
    }
}
