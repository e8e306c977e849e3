//! TLS termination material: the sites' certificates and keys, checked
//! before they go live, and the table that picks one by SNI.
//!
//! A [`CertTable`] is part of a configuration snapshot, so reloading
//! certificates is swapping the snapshot: new handshakes see the new
//! certificate, established connections keep the session they have.
//!
//! Checks made on load, each failing with the file's name: the file reads,
//! holds PEM of the right kind (a certificate chain, a private key), the
//! key is one rustls can sign with and matches the leaf certificate, the
//! leaf is within its validity period and names the site (a DNS
//! subject-alternative name, `*.` wildcards covering one label). X.509
//! fields are read with the `x509-parser` crate.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

use crate::config::{Config, SiteConfig};

/// ALPN protocols offered, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// TLS sessions remembered for resumption by session id, per listener.
const SESSION_CACHE: usize = 4096;

/// One thing wrong with a site's certificate or key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialProblem {
    /// The site whose material it is.
    pub site: String,
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong, as a sentence.
    pub reason: String,
}

impl fmt::Display for MaterialProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "site {:?}: {}: {}",
            self.site,
            self.path.display(),
            self.reason
        )
    }
}

/// The certificates and keys of one or more sites could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub struct TlsError {
    /// Every problem found, site by site. Never empty.
    pub problems: Vec<MaterialProblem>,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bad TLS material")?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// What the admin UI shows about a loaded certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The site.
    pub site: String,
    /// The certificate file.
    pub cert: PathBuf,
    /// The DNS names the leaf certificate covers.
    pub names: Vec<String>,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

/// The certificates of one TLS listener.
#[derive(Debug)]
struct ListenerCerts {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// For clients that send no SNI (they asked for no name in particular).
    first: Arc<CertifiedKey>,
    /// For names no site on this listener serves (`default-site`).
    fallback: Option<Arc<CertifiedKey>>,
}

/// Every site's certificate, by TLS listener and name.
#[derive(Debug, Default)]
pub struct CertTable {
    listeners: HashMap<SocketAddr, ListenerCerts>,
    info: Vec<CertInfo>,
}

impl CertTable {
    /// Loads and checks the material of every site of `config`, collecting
    /// every problem. Blocking (file reads): call it off the async path.
    /// `now` decides expiry.
    pub fn load(config: &Config, now: SystemTime) -> Result<CertTable, TlsError> {
        let provider = provider();
        let mut loaded: HashMap<&str, Arc<CertifiedKey>> = HashMap::new();
        let mut info = Vec::new();
        let mut problems = Vec::new();
        for site in &config.sites {
            match load_site(site, &provider, now) {
                Ok((key, i)) => {
                    loaded.insert(&site.name, key);
                    info.push(i);
                }
                Err(p) => problems.extend(p),
            }
        }
        if !problems.is_empty() {
            return Err(TlsError { problems });
        }
        let mut listeners: HashMap<SocketAddr, ListenerCerts> = HashMap::new();
        for site in &config.sites {
            let key = &loaded[site.name.as_str()];
            for addr in &site.listen {
                let l = listeners.entry(*addr).or_insert_with(|| ListenerCerts {
                    by_name: HashMap::new(),
                    first: key.clone(),
                    fallback: None,
                });
                l.by_name.insert(site.name.clone(), key.clone());
                if config.default_site.as_deref() == Some(site.name.as_str()) {
                    l.fallback = Some(key.clone());
                }
            }
        }
        Ok(CertTable { listeners, info })
    }

    /// The certificate for a handshake on the TLS listener configured as
    /// `listener`: the site named by `sni`, else the default site if it is
    /// on this listener; with no SNI, the listener's first site. `None`
    /// fails the handshake.
    pub fn resolve(&self, listener: SocketAddr, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let l = self.listeners.get(&listener)?;
        match sni {
            None => Some(l.first.clone()),
            Some(name) => l
                .by_name
                .get(&name.to_ascii_lowercase())
                .or(l.fallback.as_ref())
                .cloned(),
        }
    }

    /// The loaded certificates, in config order.
    pub fn info(&self) -> &[CertInfo] {
        &self.info
    }
}

/// The crypto provider for TLS termination (the same `ring` the upstream
/// client uses).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration of a TLS listener: TLS 1.2 and 1.3 (rustls'
/// safe defaults), ALPN `h2` and `http/1.1`, resumption by session id and
/// by ticket, certificates from `resolver`. One per listener for its whole
/// life, so resumption survives reloads.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Loads one site's chain and key and checks them.
fn load_site(
    site: &SiteConfig,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, CertInfo), Vec<MaterialProblem>> {
    let problem = |path: &Path, reason: String| MaterialProblem {
        site: site.name.clone(),
        path: path.to_path_buf(),
        reason,
    };
    // Both files are read before giving up, so one run reports both.
    let chain = read_chain(&site.cert).map_err(|r| problem(&site.cert, r));
    let key = read_key(&site.key).map_err(|r| problem(&site.key, r));
    let (chain, key) = match (chain, key) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let signer = provider.key_provider.load_private_key(key).map_err(|e| {
        vec![problem(
            &site.key,
            format!("cannot use this private key: {e}"),
        )]
    })?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => {}
        // rustls cannot tell for this key type; the handshake will.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(vec![problem(
                &site.key,
                format!(
                    "this key does not match the certificate in {}",
                    site.cert.display()
                ),
            )]);
        }
        Err(e) => {
            return Err(vec![problem(
                &site.cert,
                format!("cannot read the certificate: {e}"),
            )]);
        }
    }
    let leaf = certified.cert[0].clone();
    let info = check_leaf(site, &leaf, now).map_err(|r| vec![problem(&site.cert, r)])?;
    Ok((Arc::new(certified), info))
}

/// A PEM file's certificate chain, leaf first.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if chain.is_empty() {
        if PrivateKeyDer::from_pem_slice(&bytes).is_ok() {
            return Err(
                "holds a private key, not a certificate: are cert= and key= swapped?".to_owned(),
            );
        }
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(chain)
}

/// A PEM file's private key.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            if CertificateDer::pem_slice_iter(&bytes).next().is_some() {
                Err(
                    "holds a certificate, not a private key: are cert= and key= swapped?"
                        .to_owned(),
                )
            } else {
                Err("holds no PEM private key (-----BEGIN PRIVATE KEY-----)".to_owned())
            }
        }
        Err(e) => Err(format!("not a PEM private key file: {e}")),
    }
}

/// Validity period and names of the leaf certificate.
fn check_leaf(
    site: &SiteConfig,
    leaf: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the leaf certificate is not valid X.509: {e}"))?;
    let validity = cert.validity();
    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now_secs > validity.not_after.timestamp() {
        return Err(format!("the certificate expired on {}", validity.not_after));
    }
    if now_secs < validity.not_before.timestamp() {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if !names.iter().any(|n| covers(n, &site.name)) {
        let listed = if names.is_empty() {
            "no DNS names".to_owned()
        } else {
            names.join(", ")
        };
        return Err(format!(
            "the certificate is for {listed}, not {}: clients would refuse it",
            site.name
        ));
    }
    let not_after = UNIX_EPOCH + Duration::from_secs(validity.not_after.timestamp().max(0) as u64);
    Ok(CertInfo {
        site: site.name.clone(),
        cert: site.cert.clone(),
        names,
        not_after,
    })
}

/// Whether certificate name `pattern` covers host `name` (RFC 6125: a
/// leading `*.` stands for exactly one label).
fn covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn wildcards_cover_exactly_one_label() {
        assert!(covers("example.org", "example.org"));
        assert!(covers("*.example.org", "www.example.org"));
        assert!(!covers("*.example.org", "example.org"));
        assert!(!covers("*.example.org", "a.b.example.org"));
        assert!(!covers("www.example.org", "example.org"));
    }
}
