//! HTTPS on the ingress: rustls with a certificate that can be replaced while serving.
//!
//! `tls: { cert, key }` makes the relay terminate TLS itself, so a lone VM needs no
//! nginx or Caddy in front. ALPN offers `h2` and `http/1.1` (FACEIO's sender speaks
//! both); the hyper builder behind the handshake serves whichever was chosen.
//!
//! # Invariants
//! - **Renewals never drop connections.** The server config asks `CertResolver` for a
//!   certificate at every handshake; [`TlsHandle::reload`] swaps what it hands out.
//!   Established connections keep the session they negotiated; only handshakes after the
//!   swap see the new certificate.
//! - **A failed reload changes nothing.** The new files are read and checked completely
//!   (certificate chain parses, key parses, key matches the certificate) before the swap;
//!   on any error the old certificate keeps serving and the error is returned.
//! - **Errors name the file and the problem, never key material**: PEM errors are
//!   rephrased rather than passed on, because the PEM parser's own messages may quote the
//!   offending line.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::TlsConfig;

/// ALPN protocols offered, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate or key could not be loaded. Shows the file and the problem only.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read at all. (`error` is shown, not chained as a source,
    /// so `{:#}` does not print it twice.)
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file was read but its content is unusable.
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    /// rustls refused to build a server config (should not happen with the ring provider).
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// A cloneable handle on the ingress TLS setup: makes acceptors, reloads the certificate.
///
/// Every clone shares one resolver, so a [`reload`](Self::reload) through any clone is
/// seen by every later handshake.
#[derive(Debug, Clone)]
pub struct TlsHandle {
    /// What handshakes ask for a certificate; holds the current one.
    resolver: Arc<CertResolver>,
    /// The rustls config built around `resolver`; shared by every acceptor.
    server: Arc<ServerConfig>,
}

impl TlsHandle {
    /// Reads and checks the certificate and key named in `files`.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let current = load_certified_key(files, &provider)?;
        let resolver = Arc::new(CertResolver {
            files: Mutex::new(files.clone()),
            current: ArcSwap::from_pointee(current),
            provider: Arc::clone(&provider),
        });
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            resolver,
            server: Arc::new(server),
        })
    }

    /// An acceptor that performs handshakes with the current (and any later) certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.server))
    }

    /// Re-reads the certificate and key files (after a renewal). On error the certificate
    /// served so far stays in place and the error says which file is wrong and why.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.resolver.reload(None)
    }

    /// Like [`reload`](Self::reload), but from other files (the `tls:` paths changed in
    /// relay.yaml). The new paths are kept only if they load.
    pub fn reload_from(&self, files: &TlsConfig) -> Result<(), TlsError> {
        self.resolver.reload(Some(files))
    }

    /// The files the current certificate came from.
    pub fn files(&self) -> TlsConfig {
        self.resolver.files().clone()
    }
}

/// Hands every handshake the current certificate; swapped atomically on reload.
#[derive(Debug)]
struct CertResolver {
    /// Where the current certificate came from. The lock also serialises reloads, so
    /// two racing reloads cannot leave the files and the certificate out of step.
    files: Mutex<TlsConfig>,
    /// The certificate chain and signing key handed to new handshakes. Lock-free to read:
    /// handshakes never wait for a reload.
    current: ArcSwap<CertifiedKey>,
    /// Parses private keys; the same provider the server config uses.
    provider: Arc<CryptoProvider>,
}

impl CertResolver {
    fn files(&self) -> std::sync::MutexGuard<'_, TlsConfig> {
        // A panic while holding the lock cannot leave `TlsConfig` half-written.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reload(&self, new_files: Option<&TlsConfig>) -> Result<(), TlsError> {
        let mut files = self.files();
        let source = new_files.unwrap_or(&files).clone();
        let key = load_certified_key(&source, &self.provider)?;
        self.current.store(Arc::new(key));
        *files = source;
        tracing::info!(
            cert = %files.cert.display(),
            key = %files.key.display(),
            "TLS certificate reloaded"
        );
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads the chain and the key and checks that they belong together.
fn load_certified_key(
    files: &TlsConfig,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_chain(&files.cert)?;
    let key = load_key(&files.key)?;
    let invalid = |problem: String| TlsError::Invalid {
        path: files.key.clone(),
        problem,
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(format!("unsupported private key ({e})")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(invalid(format!(
                "this key does not belong to the certificate in {}",
                files.cert.display()
            )))
        }
        Err(e) => Err(TlsError::Invalid {
            path: files.cert.clone(),
            problem: format!("unusable certificate ({e})"),
        }),
    }
}

/// The PEM certificates in `path`, end-entity first.
fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &e))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            problem: "no PEM certificate (-----BEGIN CERTIFICATE-----) found".into(),
        });
    }
    Ok(chain)
}

/// The first PEM private key in `path` (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Invalid {
            path: path.to_owned(),
            problem: "no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC) found".into(),
        },
        e => pem_error(path, &e),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Describes a PEM error without quoting the file (which may hold a key).
fn pem_error(path: &Path, e: &pem::Error) -> TlsError {
    let problem = match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no -----END line",
        pem::Error::IllegalSectionStart { .. } => "malformed -----BEGIN line",
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        pem::Error::NoItemsFound => "nothing usable found",
        _ => "not valid PEM",
    };
    TlsError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn write(&self, name: &str, content: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        }
        /// A fresh self-signed pair as (cert path, key path, key PEM).
        fn pair(&self, prefix: &str) -> (PathBuf, PathBuf, String) {
            let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            let key = c.signing_key.serialize_pem();
            (
                self.write(&format!("{prefix}.crt"), &c.cert.pem()),
                self.write(&format!("{prefix}.key"), &key),
                key,
            )
        }
    }

    fn load(cert: &Path, key: &Path) -> Result<TlsHandle, TlsError> {
        TlsHandle::load(&TlsConfig {
            cert: cert.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Asserts the message names `path` and shows nothing of `secret`.
    fn assert_names(e: &TlsError, path: &Path, fragment: &str, secret: &str) {
        let shown = e.to_string();
        assert!(shown.starts_with(&path.display().to_string()), "{shown}");
        assert!(shown.contains(fragment), "{shown}");
        for line in secret.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "message shows key material: {shown}");
        }
    }

    #[test]
    fn a_matching_pair_loads() {
        let f = Files::new();
        let (cert, key, _) = f.pair("a");
        let handle = load(&cert, &key).unwrap();
        assert_eq!(handle.files().cert, cert);
        assert_eq!(
            handle.server.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let f = Files::new();
        let (cert, key, key_pem) = f.pair("a");
        let (_, other_key, other_pem) = f.pair("b");
        let missing = f.dir.path().join("missing.pem");

        let e = load(&missing, &key).unwrap_err();
        assert_names(&e, &missing, "cannot read", &key_pem);

        let e = load(&key, &key).unwrap_err();
        assert_names(&e, &key, "no PEM certificate", &key_pem);

        let e = load(&cert, &cert).unwrap_err();
        assert_names(&e, &cert, "no PEM private key", &key_pem);

        let e = load(&cert, &other_key).unwrap_err();
        assert_names(
            &e,
            &other_key,
            "does not belong to the certificate",
            &other_pem,
        );

        // A corrupt key: the body of a real key with one line broken.
        let broken = key_pem.replacen('\n', "\n!!not base64!!\n", 1);
        let broken_path = f.write("broken.key", &broken);
        let e = load(&cert, &broken_path).unwrap_err();
        assert_names(&e, &broken_path, "", &key_pem);

        let truncated = key_pem.lines().take(2).collect::<Vec<_>>().join("\n");
        let truncated_path = f.write("truncated.key", &truncated);
        let e = load(&cert, &truncated_path).unwrap_err();
        assert_names(&e, &truncated_path, "no -----END line", &key_pem);
    }

    #[test]
    fn failed_reload_keeps_the_old_certificate() {
        let f = Files::new();
        let (cert, key, _) = f.pair("a");
        let handle = load(&cert, &key).unwrap();
        let before = handle.resolver.current.load_full();

        std::fs::write(&cert, "not a certificate").unwrap();
        let e = handle.reload().unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        assert!(Arc::ptr_eq(&before, &handle.resolver.current.load_full()));

        let (new_cert, new_key, _) = f.pair("b");
        let clone = handle.clone();
        clone
            .reload_from(&TlsConfig {
                cert: new_cert.clone(),
                key: new_key,
            })
            .unwrap();
        let after = handle.resolver.current.load_full();
        assert_ne!(before.cert, after.cert, "every clone sees the reload");
        assert_eq!(handle.files().cert, new_cert);
    }
}
