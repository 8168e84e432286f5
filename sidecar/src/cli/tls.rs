//! `patina tls ca generate | server generate | client generate`: PEM files for mutual TLS.
//!
//! The CA signs node certificates. Every node both dials and accepts, so node
//! certificates carry both the server and client EKUs and always name `localhost` and
//! `127.0.0.1` besides any `--san`. The library functions are public so tests can make
//! certificates without spawning the binary.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::{TlsArgs, TlsCaGenerate, TlsGenerate, TlsGenerateArgs, TlsKind};

/// Which certificate a `generate` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertKind {
    Ca,
    Server,
    Client,
}

impl CertKind {
    fn default_name(self) -> &'static str {
        match self {
            CertKind::Ca => "ca",
            CertKind::Server => "server",
            CertKind::Client => "client",
        }
    }
}

/// The two files a `generate` wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Failures of certificate generation; none of them leaves a partial pair behind
/// (existing files are checked before anything is written).
#[derive(Debug, thiserror::Error)]
pub enum TlsGenError {
    /// The output exists and `--force` was not given; nothing was written.
    #[error("{} already exists (use --force to overwrite)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The CA certificate or key does not exist; nothing was written.
    #[error(
        "CA file {} not found: create the cluster CA first with `patina tls ca generate \
         --out-dir DIR`, then pass --ca-cert DIR/ca.pem --ca-key DIR/ca.key (or run this \
         in DIR)",
        .0.display()
    )]
    NoCa(PathBuf),
    /// The CA certificate or key cannot be used to sign; nothing was written.
    #[error("CA file {}: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("generating the certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Runs `patina tls`.
pub fn run(args: TlsArgs) -> anyhow::Result<()> {
    let (kind, g) = match args.kind {
        TlsKind::Ca {
            action: TlsCaGenerate::Generate(c),
        } => (
            CertKind::Ca,
            TlsGenerateArgs {
                out_dir: c.out_dir,
                ca_cert: PathBuf::new(),
                ca_key: PathBuf::new(),
                sans: Vec::new(),
                name: c.name,
                force: c.force,
            },
        ),
        TlsKind::Server {
            action: TlsGenerate::Generate(g),
        } => (CertKind::Server, g),
        TlsKind::Client {
            action: TlsGenerate::Generate(g),
        } => (CertKind::Client, g),
    };
    let written = generate(kind, &g)?;
    println!("wrote {} (certificate)", written.cert.display());
    println!("wrote {} (private key, mode 0600)", written.key.display());
    Ok(())
}

/// Generates one pair as `patina tls <kind> generate` would.
pub fn generate(kind: CertKind, args: &TlsGenerateArgs) -> Result<Written, TlsGenError> {
    let name = args.name.as_deref().unwrap_or(kind.default_name());
    let out = Written {
        cert: args.out_dir.join(format!("{name}.pem")),
        key: args.out_dir.join(format!("{name}.key")),
    };
    if !args.force {
        for p in [&out.cert, &out.key] {
            if p.exists() {
                return Err(TlsGenError::Exists(p.clone()));
            }
        }
    }
    let key = KeyPair::generate()?;
    let cert_pem = match kind {
        CertKind::Ca => ca_params()?.self_signed(&key)?.pem(),
        CertKind::Server | CertKind::Client => {
            let (issuer, issuer_key) = load_issuer(&args.ca_cert, &args.ca_key)?;
            let leaf = node_params(name, &args.sans)?.signed_by(&key, &issuer, &issuer_key)?;
            check_chain(&args.ca_cert, leaf.der())?;
            leaf.pem()
        }
    };
    fs::create_dir_all(&args.out_dir).map_err(|error| TlsGenError::Io {
        path: args.out_dir.clone(),
        error,
    })?;
    write_file(&out.cert, cert_pem.as_bytes(), 0o644)?;
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(out)
}

fn ca_params() -> Result<CertificateParams, TlsGenError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    // A random suffix keeps two clusters' CAs apart even by name.
    let suffix: [u8; 4] = rand::random();
    p.distinguished_name = ca_dn(&format!("patina cluster CA {}", hex::encode(suffix)));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn ca_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn node_params(name: &str, extra_sans: &[String]) -> Result<CertificateParams, TlsGenError> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for s in extra_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let mut p = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("patina {name}"));
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Rebuilds the CA as an rcgen issuer from its PEM and key. rcgen 0.13 (without
/// x509-parser) cannot parse a certificate, so the subject CN is read from the DER; a CA
/// with a richer subject is caught by [`check_chain`] afterwards.
fn load_issuer(
    ca_cert: &Path,
    ca_key: &Path,
) -> Result<(rcgen::Certificate, KeyPair), TlsGenError> {
    let ca_err = |path: &Path, reason: String| TlsGenError::Ca {
        path: path.to_path_buf(),
        reason,
    };
    for f in [ca_key, ca_cert] {
        if !f.exists() {
            return Err(TlsGenError::NoCa(f.to_path_buf()));
        }
    }
    let key_pem = fs::read_to_string(ca_key).map_err(|error| TlsGenError::Io {
        path: ca_key.to_path_buf(),
        error,
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| ca_err(ca_key, e.to_string()))?;
    let der = read_cert_der(ca_cert)?;
    if !contains(der.as_ref(), &key.public_key_der()) {
        return Err(ca_err(
            ca_key,
            format!("this key does not belong to {}", ca_cert.display()),
        ));
    }
    let cn = first_common_name(der.as_ref()).ok_or_else(|| {
        ca_err(
            ca_cert,
            "no common name in the certificate subject".to_string(),
        )
    })?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = ca_dn(&cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = p.self_signed(&key)?;
    Ok((issuer, key))
}

fn read_cert_der(path: &Path) -> Result<CertificateDer<'static>, TlsGenError> {
    let pem = fs::read(path).map_err(|error| TlsGenError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let first = rustls_pemfile::certs(&mut pem.as_slice()).next();
    first
        .ok_or_else(|| TlsGenError::Ca {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".to_string(),
        })?
        .map_err(|e| TlsGenError::Ca {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Verifies the new certificate against the CA file exactly as a peer will.
fn check_chain(ca_cert: &Path, leaf: &CertificateDer<'_>) -> Result<(), TlsGenError> {
    let ca_err = |reason: String| TlsGenError::Ca {
        path: ca_cert.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(read_cert_der(ca_cert)?)
        .map_err(|e| ca_err(e.to_string()))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::net::tls::provider(),
    )
    .build()
    .map_err(|e| ca_err(e.to_string()))?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| ca_err(e.to_string()))?;
    verifier
        .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
        .map_err(|e| ca_err(format!("the signed certificate does not verify against this CA ({e}); only CAs made by `patina tls ca generate` are supported")))?;
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The first commonName value in a DER certificate: the issuer's, which for a
/// self-signed CA is its subject.
fn first_common_name(der: &[u8]) -> Option<String> {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(CN_OID.len()).position(|w| w == CN_OID)? + CN_OID.len();
    let tag = *der.get(at)?;
    let len = *der.get(at + 1)? as usize;
    // UTF8String, PrintableString or IA5String with a short-form length.
    if !matches!(tag, 0x0c | 0x13 | 0x16) || len >= 0x80 {
        return None;
    }
    let value = der.get(at + 2..at + 2 + len)?;
    String::from_utf8(value.to_vec()).ok()
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsGenError> {
    let io = |error| TlsGenError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // `mode` only applies to new files; an overwritten key must not keep looser bits.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn args(dir: &Path, name: Option<&str>) -> TlsGenerateArgs {
        TlsGenerateArgs {
            out_dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            sans: vec!["node1.example".to_string(), "10.0.0.1".to_string()],
            name: name.map(str::to_string),
            force: false,
        }
    }

    #[test]
    fn ca_then_server_then_client() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate(CertKind::Ca, &args(dir.path(), None)).unwrap();
        assert_eq!(fs::metadata(&ca.key).unwrap().mode() & 0o777, 0o600);
        let s = generate(CertKind::Server, &args(dir.path(), None)).unwrap();
        assert!(s.cert.ends_with("server.pem"));
        assert_eq!(fs::metadata(&s.key).unwrap().mode() & 0o777, 0o600);
        let c = generate(CertKind::Client, &args(dir.path(), Some("n2"))).unwrap();
        assert!(c.cert.ends_with("n2.pem") && c.key.ends_with("n2.key"));
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        generate(CertKind::Ca, &args(dir.path(), None)).unwrap();
        let before = fs::read(dir.path().join("ca.pem")).unwrap();
        assert!(matches!(
            generate(CertKind::Ca, &args(dir.path(), None)),
            Err(TlsGenError::Exists(_))
        ));
        assert_eq!(before, fs::read(dir.path().join("ca.pem")).unwrap());
        let mut a = args(dir.path(), None);
        a.force = true;
        generate(CertKind::Ca, &a).unwrap();
        assert_ne!(before, fs::read(dir.path().join("ca.pem")).unwrap());
    }

    #[test]
    fn key_of_another_ca_is_refused() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        generate(CertKind::Ca, &args(one.path(), None)).unwrap();
        generate(CertKind::Ca, &args(two.path(), None)).unwrap();
        let mut a = args(one.path(), None);
        a.ca_key = two.path().join("ca.key");
        assert!(matches!(
            generate(CertKind::Server, &a),
            Err(TlsGenError::Ca { .. })
        ));
        assert!(!one.path().join("server.pem").exists());
    }

    #[test]
    fn missing_ca_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = generate(CertKind::Server, &args(dir.path(), None)).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert!(err.to_string().contains("patina tls ca generate"), "{err}");
    }
}
