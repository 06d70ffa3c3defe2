//! HTTP/3 in the lab: the QUIC-LB connection-ID generator ([`cid`]), the HTTP/3 server the
//! lab's web server runs on VIP:443/udp ([`server`]) and the client that downloads over it
//! ([`client`]). TLS is rustls on ring with one self-signed certificate that the lab writes
//! once and every node serves; the client trusts exactly that certificate.

pub mod cid;
pub mod client;
pub mod server;

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The name the certificate is issued for and the client asks for (SNI).
pub const SERVER_NAME: &str = "lab.cdn-steer.test";
/// HTTP/3's ALPN token.
const ALPN_H3: &[u8] = b"h3";

/// A certificate and its private key, both DER.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Identity {
    /// A fresh self-signed certificate for [`SERVER_NAME`].
    pub fn self_signed() -> Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .context("generating the self-signed certificate")?;
        Ok(Self {
            cert: certified.cert.der().to_vec(),
            key: certified.signing_key.serialize_der(),
        })
    }

    /// Writes the certificate and the key (DER) to `cert` and `key`.
    pub fn write(&self, cert: &Path, key: &Path) -> Result<()> {
        std::fs::write(cert, &self.cert).with_context(|| format!("writing {}", cert.display()))?;
        std::fs::write(key, &self.key).with_context(|| format!("writing {}", key.display()))?;
        Ok(())
    }

    pub fn read(cert: &Path, key: &Path) -> Result<Self> {
        Ok(Self {
            cert: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side's TLS: TLS 1.3 (QUIC needs it), ALPN h3, the identity's certificate.
pub fn server_tls(identity: &Identity) -> Result<quinn::crypto::rustls::QuicServerConfig> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(identity.cert.clone())], key)
        .context("the server certificate")?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC server TLS")
}

/// The client side's TLS: trusts `cert` (DER) only.
pub fn client_tls(cert: &[u8]) -> Result<quinn::crypto::rustls::QuicClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.to_vec()))
        .context("trusting the lab certificate")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC client TLS")
}
