//! Certificates for the zone: an operator's wildcard certificate (PEM files, reloaded when they
//! change), or a local CA that the cluster creates once (rcgen, ECDSA P-256) with a wildcard
//! certificate for `*.<zone>` and `<zone>`. The local CA lives in the replica, so every proxy
//! serves the same certificate; each proxy writes it to `<data-dir>/tls/` for `curl --cacert`.
//!
//! The server's certificate resolver holds the key in an `ArcSwap`: a reload swaps it for new
//! handshakes while open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why certificates could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// File.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Generating the local CA failed.
    #[error("creating the local CA: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("certificate and key do not work together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate files in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// The local CA's certificate, when boxd made the certificate.
    pub ca: Option<PathBuf>,
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A local CA and the zone certificate it signed, as PEM text (what the replica stores).
pub use boxd_model::model::TlsMaterial as LocalCa;

/// Writes a local CA's files into `dir` (created if missing) and names them.
pub fn write_local_ca(ca: &LocalCa, dir: &Path) -> Result<CertFiles, TlsError> {
    {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let files = CertFiles {
            cert: dir.join("zone.crt"),
            key: dir.join("zone.key"),
            ca: Some(dir.join("ca.crt")),
        };
        write(&dir.join("ca.crt"), &ca.ca_cert, 0o644)?;
        write(&files.key, &ca.key, 0o600)?;
        write(&files.cert, &ca.chain, 0o644)?;
        Ok(files)
    }
}

/// The local CA and zone certificate in `dir`, created on first use.
pub fn local_ca(dir: &Path, zone: &str) -> Result<CertFiles, TlsError> {
    let files = CertFiles {
        cert: dir.join("zone.crt"),
        key: dir.join("zone.key"),
        ca: Some(dir.join("ca.crt")),
    };
    if files.cert.exists() && files.key.exists() && dir.join("ca.crt").exists() {
        return Ok(files);
    }
    write_local_ca(&generate_local_ca(zone)?, dir)
}

/// A new local CA for `zone` with a wildcard certificate for `*.<zone>` and `<zone>`.
pub fn generate_local_ca(zone: &str) -> Result<LocalCa, TlsError> {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("boxd local CA for {zone}"),
    );
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2044, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![format!("*.{zone}"), zone.to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("*.{zone}"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2044, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(LocalCa {
        ca_cert: ca_cert.pem(),
        chain: cert.pem() + &ca_cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Loads a certificate chain and key into a rustls signing key.
pub fn load(files: &CertFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let pem_err = |path: &Path, reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_err(&files.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(
            &files.cert,
            "no CERTIFICATE block: give a PEM certificate chain".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        pem_err(
            &files.key,
            format!("{e}: give a PEM private key (PKCS#8, SEC1 or PKCS#1)"),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider)?))
}

/// Serves one certificate for every name (the zone's wildcard): a client that asks for an
/// unknown name gets the zone's certificate, never another one. [`ZoneCert::replace`] swaps
/// it for new handshakes (lock-free for readers); open connections keep the one they got.
#[derive(Debug)]
pub struct ZoneCert(arc_swap::ArcSwap<CertifiedKey>);

impl ZoneCert {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(arc_swap::ArcSwap::new(key)))
    }

    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl ResolvesServerCert for ZoneCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The cipher suites, in the order the server chooses among those a client offers. The server
/// chooses (HAProxy's and nginx's default too, and Mozilla's recommended order): AES-128-GCM
/// first. Its TLS 1.3 suite runs the key schedule on SHA-256, which current x86 (SHA-NI) and ARM
/// CPUs compute in hardware, where SHA-384 is software: ring's SHA-512 was 8 % of a resumed
/// handshake's CPU on an AMD EPYC shard. OpenSSL clients list AES-256 first.
const CIPHER_SUITES: &[rustls::SupportedCipherSuite] = &[
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// TLS 1.2 and 1.3, ALPN h2 and http/1.1, session tickets on, no OCSP, certificates from `certs`,
/// the server's cipher suite order ([`CIPHER_SUITES`]).
pub fn server_config(certs: Arc<ZoneCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.ignore_client_order = true;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
    // One TLS 1.3 ticket per handshake, as Go's crypto/tls sends and OpenSSL sends after a
    // resumed handshake (rustls's default is two, always): a resuming client gets the one it
    // spent back, and a ticket costs the server a key derivation, an encryption and a record.
    cfg.send_tls13_tickets = 1;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::ServerName;

    #[test]
    fn local_ca_is_made_once_and_loads() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = local_ca(d.path(), "boxd.test").expect("create");
        let first = std::fs::read(&a.cert).expect("cert");
        let b = local_ca(d.path(), "boxd.test").expect("reuse");
        assert_eq!(a, b);
        assert_eq!(
            std::fs::read(&b.cert).expect("cert"),
            first,
            "not regenerated"
        );
        let key = load(&a).expect("load");
        assert_eq!(key.cert.len(), 2, "leaf and CA");
        server_config(ZoneCert::new(key)).expect("config");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&a.key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// A client trusting the CA in `ca`, listing the provider's default suite order (AES-256
    /// first, as OpenSSL does).
    fn client_config(
        ca: &Path,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).expect("ca") {
            roots.add(c.expect("ca cert")).expect("root");
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    /// Handshakes an in-memory client against `server`, and lets it read what the server sends
    /// after the handshake (session tickets).
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> rustls::ClientConnection {
        let name = rustls_pki_types::ServerName::try_from("myapp.boxd.test").expect("name");
        let mut c = rustls::ClientConnection::new(client, name).expect("client");
        let mut s = rustls::ServerConnection::new(server).expect("server");
        for _ in 0..10 {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).expect("client writes");
            s.read_tls(&mut wire.as_slice()).expect("server reads");
            s.process_new_packets().expect("server handshake");
            let mut wire = Vec::new();
            s.write_tls(&mut wire).expect("server writes");
            c.read_tls(&mut wire.as_slice()).expect("client reads");
            c.process_new_packets().expect("client handshake");
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!c.is_handshaking(), "handshake did not finish");
        c
    }

    /// Handshakes an in-memory client against `server`; returns the negotiated suite.
    fn negotiate(
        server: Arc<ServerConfig>,
        ca: &Path,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::CipherSuite {
        let c = handshake(server, Arc::new(client_config(ca, versions)));
        c.negotiated_cipher_suite().expect("suite").suite()
    }

    /// A client session store that counts the TLS 1.3 tickets it is given.
    #[derive(Debug)]
    struct CountingStore {
        inner: rustls::client::ClientSessionMemoryCache,
        tickets: std::sync::atomic::AtomicUsize,
    }

    impl rustls::client::ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
            self.inner.set_kx_hint(name, group);
        }
        fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(name)
        }
        fn set_tls12_session(
            &self,
            name: ServerName<'static>,
            value: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(name, value);
        }
        fn tls12_session(
            &self,
            name: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &ServerName<'static>) {
            self.inner.remove_tls12_session(name);
        }
        fn insert_tls13_ticket(
            &self,
            name: ServerName<'static>,
            value: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.insert_tls13_ticket(name, value);
        }
        fn take_tls13_ticket(
            &self,
            name: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(name)
        }
    }

    #[test]
    fn one_session_ticket_per_handshake_full_or_resumed() {
        let d = tempfile::tempdir().expect("tempdir");
        let files = local_ca(d.path(), "boxd.test").expect("ca");
        let server = server_config(ZoneCert::new(load(&files).expect("load"))).expect("config");
        let ca = files.ca.clone().expect("local CA file");
        let store = Arc::new(CountingStore {
            inner: rustls::client::ClientSessionMemoryCache::new(32),
            tickets: std::sync::atomic::AtomicUsize::new(0),
        });
        let mut client = client_config(&ca, &[&rustls::version::TLS13]);
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        let tickets = || store.tickets.load(std::sync::atomic::Ordering::Relaxed);

        let full = handshake(Arc::clone(&server), Arc::clone(&client));
        assert_eq!(full.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(tickets(), 1, "tickets after a full handshake");
        for round in 2..=4 {
            let resumed = handshake(Arc::clone(&server), Arc::clone(&client));
            assert_eq!(
                resumed.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed),
                "handshake {round} resumes with the ticket it was given"
            );
            assert_eq!(tickets(), round, "one new ticket per resumed handshake");
        }
    }

    #[test]
    fn the_server_chooses_aes_128_gcm_over_the_clients_first_choice() {
        let d = tempfile::tempdir().expect("tempdir");
        let files = local_ca(d.path(), "boxd.test").expect("ca");
        let server = server_config(ZoneCert::new(load(&files).expect("load"))).expect("config");
        let ca = files.ca.clone().expect("local CA file");
        assert_eq!(
            negotiate(Arc::clone(&server), &ca, &[&rustls::version::TLS13]),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            negotiate(server, &ca, &[&rustls::version::TLS12]),
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
    }

    #[test]
    fn bad_files_are_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let cert = d.path().join("c.pem");
        std::fs::write(&cert, "not pem").expect("write");
        let e = load(&CertFiles {
            cert: cert.clone(),
            key: d.path().join("missing.key"),
            ca: None,
        })
        .expect_err("bad");
        assert!(e.to_string().contains("c.pem"), "{e}");
    }
}
