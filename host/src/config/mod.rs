//! `config.kdl` → a typed, validated [`Config`].
//!
//! The file is KDL v2 (`#true`/`#false`); `docs/config.md` is the reference
//! for every node. Loading never stops at the first problem: a
//! [`ConfigError`] lists them all, each with file, line and column, and
//! renders through `miette`. Relative paths in the file resolve against the
//! file's own directory, so a config works whatever directory Cistern was
//! started from.

mod error;
mod model;
mod parse;
pub(crate) mod units;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, Problem};
pub use model::*;

/// The policies of plain mode ([`Config::plain`]), in the config file's
/// own words: what a `config.kdl` needs to do the same.
pub const PLAIN_POLICIES: &str = r#"
policy "store-id" path="builtin:store-id" {
    param "rule" "http://*/debian/pool/* http://debian.cistern/pool/$2"
    param "rule" "http://*/debian-security/pool/* http://debian-security.cistern/pool/$2"
}
policy "distro" path="builtin:distro"
forward {
    policies "store-id" "distro"
}
"#;

impl Config {
    /// Reads, parses and validates the config file at `path`. Relative paths
    /// in it resolve against its directory (made absolute first, so later
    /// changes of working directory do not move them). Files the config
    /// names (CA files, policy modules) must exist.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let absolute = std::path::absolute(path).map_err(read_error)?;
        let text = std::fs::read_to_string(&absolute).map_err(read_error)?;
        let mut config = parse::parse(&text, &absolute, true)?;
        config.source = Some(absolute);
        Ok(config)
    }

    /// Parses and validates `text` as if read from the file `name`: relative
    /// paths resolve against `name`'s directory, and `name` is the file shown
    /// in problems. Touches no files, so CA files and policy modules are not
    /// checked for existence ([`Config::load`] does that).
    pub fn parse(text: &str, name: &Path) -> Result<Config, ConfigError> {
        parse::parse(text, name, false)
    }

    /// Plain mode, when there is no config file: [`Config::forward_default`]
    /// and, unless `package_policies` is off (`--no-package-policies`),
    /// the built-in `store-id` (Debian's pools as one replica) and `distro`
    /// policies ([`PLAIN_POLICIES`]) on the forward proxy, so that packages
    /// are cached even from mirrors that send no validators or freshness
    /// (Debian's send neither) and index files are revalidated.
    pub fn plain(cwd: &Path, package_policies: bool) -> Config {
        let mut config = Config::forward_default(cwd);
        if package_policies {
            let policies = parse::parse(PLAIN_POLICIES, &cwd.join("(plain mode)"), false)
                .expect("the built-in plain-mode policies are valid");
            config.policies = policies.policies;
            config.forward.policies = policies.forward.policies;
        }
        config
    }

    /// The configuration used when there is no config file: a plain forward
    /// proxy on 127.0.0.1:8080 for loopback clients, keeping its replica in
    /// `cwd` (like HTTP Replicator), with no mirrors and no policies.
    pub fn forward_default(cwd: &Path) -> Config {
        let root: PathBuf = cwd.to_path_buf();
        Config {
            source: None,
            listeners: vec![Listener {
                addr: parse::DEFAULT_LISTEN
                    .parse()
                    .expect("valid default address"),
            }],
            store: StoreConfig {
                state: parse::default_state(&root),
                root,
                layout: Layout::HostPort,
                max_size: None,
                min_free: DEFAULT_MIN_FREE,
            },
            forward: parse::default_forward(),
            mirrors: Vec::new(),
            limits: LimitsConfig::default(),
            timeouts: Timeouts::default(),
            mode: CacheMode::default(),
            upstream_tls: UpstreamTls::default(),
            policies: Vec::new(),
            limiters: Vec::new(),
            sites: Vec::new(),
            default_site: None,
            // A quick `cistern` with no file is a throwaway forward proxy:
            // no extra port unless a config file asks for one.
            admin: AdminConfig::DISABLED,
            server_names: Vec::new(),
            node_id: None,
            targeted_field: http::HeaderName::from_static(DEFAULT_TARGETED_FIELD),
            cluster: None,
        }
    }
}
