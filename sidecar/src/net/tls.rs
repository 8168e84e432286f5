//! rustls configuration for the QUIC endpoint: mutual TLS from a cluster CA, or an
//! unauthenticated mode with an ephemeral self-signed certificate (loopback only; the
//! config refuses it elsewhere unless `gossip.insecure` is set).
//!
//! Every node is both server and client, so one certificate serves both roles.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{NetError, TlsFiles};

/// ALPN of the patina peer protocol; a QUIC client of anything else is refused.
const ALPN: &[u8] = b"patina";

/// How long a silent connection lives; keep-alives are sent well within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(3);

/// The ring provider, explicitly: no aws-lc in this build. Also installed as the process
/// default so anything else using rustls agrees (an error means one is already installed).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let p = rustls::crypto::ring::default_provider();
    let _ = p.clone().install_default();
    Arc::new(p)
}

fn tls_err(file: &Path, reason: impl std::fmt::Display) -> NetError {
    NetError::Tls {
        file: file.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Loads every certificate of a PEM file.
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let pem = fs::read(path).map_err(|e| tls_err(path, e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Loads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, NetError> {
    let pem = fs::read(path).map_err(|e| tls_err(path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| tls_err(path, e))?
        .ok_or_else(|| tls_err(path, "no PRIVATE KEY block in the file"))
}

fn roots(ca_file: &Path) -> Result<Arc<RootCertStore>, NetError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert).map_err(|e| tls_err(ca_file, e))?;
    }
    Ok(Arc::new(roots))
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // 10 s always fits a VarInt, so the conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.datagram_receive_buffer_size(Some(1 << 20));
    t.datagram_send_buffer_size(1 << 20);
    // `send` returns once the peer acknowledged the stream; with QUIC's default delayed
    // ACK (25 ms) a lone message waited ~18 ms on loopback, with ACK-every-other-packet
    // and 1 ms ~2 ms. Immediate ACKs: ~0.45 ms per send, and bulk throughput did not
    // suffer (40-70 MB/s either way in a debug build), so peers ACK every such packet.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(Duration::from_millis(1)));
    ack.ack_eliciting_threshold(0u32.into());
    t.ack_frequency_config(Some(ack));
    super::limits::apply_transport_limits(&mut t);
    Arc::new(t)
}

/// The server and client halves of one endpoint.
pub(crate) struct EndpointTls {
    pub server: quinn::ServerConfig,
    pub client: quinn::ClientConfig,
}

/// Builds both halves: mutual TLS with `files`, or unauthenticated without.
pub(crate) fn configure(files: Option<&TlsFiles>) -> Result<EndpointTls, NetError> {
    let provider = provider();
    let tls13 = [&rustls::version::TLS13];
    let cfg_err =
        |what: &str, e: &dyn std::fmt::Display| NetError::TlsConfig(format!("{what}: {e}"));

    let (mut server, mut client) = match files {
        Some(f) => {
            let roots = roots(&f.ca_file)?;
            let certs = load_certs(&f.cert_file)?;
            let key = load_key(&f.key_file)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| tls_err(&f.ca_file, e))?;
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&tls13)
                .map_err(|e| cfg_err("server", &e))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())
                .map_err(|e| {
                    tls_err(
                        &f.cert_file,
                        format!("certificate and key {}: {e}", f.key_file.display()),
                    )
                })?;
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&tls13)
                .map_err(|e| cfg_err("client", &e))?
                .with_root_certificates(roots)
                .with_client_auth_cert(certs, key)
                .map_err(|e| {
                    tls_err(
                        &f.cert_file,
                        format!("certificate and key {}: {e}", f.key_file.display()),
                    )
                })?;
            (server, client)
        }
        None => {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .map_err(|e| cfg_err("ephemeral certificate", &e))?;
            let cert_der = CertificateDer::from(cert.cert.der().to_vec());
            let key = PrivateKeyDer::try_from(cert.key_pair.serialize_der())
                .map_err(|e| cfg_err("ephemeral key", &e))?;
            let server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&tls13)
                .map_err(|e| cfg_err("server", &e))?
                .with_no_client_auth()
                .with_single_cert(vec![cert_der], key)
                .map_err(|e| cfg_err("server", &e))?;
            let client = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&tls13)
                .map_err(|e| cfg_err("client", &e))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider.clone())))
                .with_no_client_auth();
            (server, client)
        }
    };
    server.alpn_protocols = vec![ALPN.to_vec()];
    client.alpn_protocols = vec![ALPN.to_vec()];

    let server = QuicServerConfig::try_from(server).map_err(|e| cfg_err("QUIC server", &e))?;
    let client = QuicClientConfig::try_from(client).map_err(|e| cfg_err("QUIC client", &e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport_config());
    // Connection attempts not yet accepted or refused, and the early data buffered for
    // them (quinn's defaults: 65,536 attempts, 10 MB each, 100 MB in all).
    server.max_incoming(4 * super::limits::MAX_HANDSHAKES);
    server.incoming_buffer_size(64 * 1024);
    server.incoming_buffer_size_total(1024 * 1024);
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport_config());
    Ok(EndpointTls { server, client })
}

/// Unauthenticated mode only: the server's certificate is ephemeral, so there is nothing
/// to verify it against. Handshake signatures are still checked (they bind the session).
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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
