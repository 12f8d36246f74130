//! A site's state directory: its configuration, its CA and router identity, its links and
//! resources. Everything is written atomically (temporary file, fsync, rename); keys are 0600.
//!
//! ```text
//! STATE/site.json            name, link-access endpoint
//! STATE/ca.crt  ca.key       the site's own CA
//! STATE/router.crt router.key the router identity, signed by the site CA
//! STATE/grants.json          access grants this site issued
//! STATE/links/NAME.json      outgoing links (peer address, peer CA, our credential)
//! STATE/links/NAME.key       the credential's private key
//! STATE/resources.json       listeners and connectors
//! STATE/admin.sock           the running router's admin socket (owner only)
//! STATE/router.lock          held by the running router: one router per state directory
//! ```

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::pki::{self, CertKey};

mod files;
mod state_file;

pub use files::{
    Busy, Lock, NotPrivate, check_private, create_private_dir, euid, lock, write_atomic,
};
pub use state_file::StateFile;

/// Failure to read or write the state directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to access {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} already holds a site; delete it first or choose another --state-dir", path.display())]
    Exists { path: PathBuf },
    #[error("no site in {}: run `skiff site create NAME` first", path.display())]
    NoSite { path: PathBuf },
    #[error("invalid site name {0:?}: use 1-63 characters of a-z, 0-9 and '-'")]
    BadName(String),
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error("--router-cert needs --ca-cert and --ca-key: the CA that signed it")]
    RouterWithoutCa,
    #[error(transparent)]
    NotPrivate(#[from] NotPrivate),
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error(
        "site {existing} already exists in {} with other settings; a site's settings change only by `skiff site delete` and applying again",
        path.display()
    )]
    Differs { existing: String, path: PathBuf },
}

/// What applying a declared site did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Created,
    Unchanged,
}

/// Certificates a user brings instead of letting the site generate them.
#[derive(Clone, Debug, Default)]
pub struct Supplied {
    pub ca: Option<CertKey>,
    pub router: Option<CertKey>,
}

/// A site's configuration, as stored in `site.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SiteConfig {
    pub name: String,
    /// `HOST:PORT` where this site accepts links (and token redemptions), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_access: Option<String>,
    /// Namespaces of this node: name -> cgroup v2 directory whose subtree is the namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, String>,
    /// Whether listeners are reachable only from their own and explicitly allowed namespaces.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate_namespaces: bool,
    /// Lifetime of the certificates the router issues itself (its identity, TLS listeners'),
    /// in seconds; one year when absent. The router renews them when a third of it is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_lifetime_secs: Option<u64>,
    /// The data path the router runs on unless `router run --datapath` says otherwise;
    /// `auto` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<crate::datapath::Mode>,
}

impl SiteConfig {
    /// How long the certificates the router issues itself are valid.
    #[must_use]
    pub fn cert_lifetime(&self) -> time::Duration {
        self.cert_lifetime_secs
            .and_then(|s| i64::try_from(s).ok())
            .map_or(pki::LEAF_LIFETIME, time::Duration::seconds)
    }
}

/// Parses a lifetime such as `90d`, `12h`, `30m` or `45s` into seconds.
///
/// # Errors
/// When the text is not a positive number followed by one of those units.
pub fn parse_lifetime(text: &str) -> Result<u64, String> {
    let split = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "{text:?}: expected a number and a unit (d, h, m or s), e.g. 90d"
            ));
        }
    };
    match number.parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(scale)
            .ok_or_else(|| format!("{text:?} is too long")),
        _ => Err(format!(
            "{text:?}: expected a positive number before the unit"
        )),
    }
}

/// A state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root` (not checked).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A file inside it.
    #[must_use]
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The admin socket's path.
    #[must_use]
    pub fn admin_socket(&self) -> PathBuf {
        self.file("admin.sock")
    }

    /// The directory of outgoing links.
    #[must_use]
    pub fn links_dir(&self) -> PathBuf {
        self.file("links")
    }

    /// Creates the declared site, or checks that the one here is the same (`skiff apply -f`
    /// and the node controller).
    ///
    /// # Errors
    /// When a site with other settings is here, or creating it fails.
    pub fn apply(&self, config: &SiteConfig) -> Result<Applied, Error> {
        match self.config() {
            Ok(existing) if existing == *config => Ok(Applied::Unchanged),
            Ok(existing) => Err(Error::Differs {
                existing: existing.name,
                path: self.root.clone(),
            }),
            Err(Error::NoSite { .. }) => self.create(config).map(|()| Applied::Created),
            Err(e) => Err(e),
        }
    }

    /// Creates a site: configuration, a new CA and a router identity signed by it.
    ///
    /// # Errors
    /// When the directory already holds a site, the name is invalid, or writing fails.
    pub fn create(&self, config: &SiteConfig) -> Result<(), Error> {
        self.create_with(config, &Supplied::default())
    }

    /// Creates a site with user-supplied certificates where given (each validated first), and
    /// generated ones otherwise.
    ///
    /// # Errors
    /// As [`StateDir::create`], and when a supplied certificate or key is unusable (the message
    /// says why), or a router certificate is given without the CA that signed it.
    pub fn create_with(&self, config: &SiteConfig, supplied: &Supplied) -> Result<(), Error> {
        validate_name(&config.name)?;
        if self.file("site.json").exists() {
            return Err(Error::Exists {
                path: self.root.clone(),
            });
        }
        let ca = match &supplied.ca {
            Some(ca) => {
                pki::validate_ca(ca)?;
                ca.clone()
            }
            None if supplied.router.is_some() => return Err(Error::RouterWithoutCa),
            None => pki::new_ca(&config.name)?,
        };
        let identity = match &supplied.router {
            Some(identity) => {
                pki::validate_router(identity, &ca.cert_pem)?;
                identity.clone()
            }
            None => pki::issue_for(
                &ca,
                &config.name,
                &router_sans(config),
                pki::Usage::ServerAndClient,
                config.cert_lifetime(),
            )?,
        };
        create_private_dir(&self.root)?;
        create_private_dir(&self.links_dir())?;
        self.write_cert_key("ca", &ca)?;
        self.write_cert_key("router", &identity)?;
        // site.json last: its presence says the site is complete.
        self.write_json("site.json", config)
    }

    /// The site's service CA, which signs TLS listeners' certificates and the bundles handed
    /// to workloads and backends. Made on first use (sites created before it existed get one
    /// then).
    ///
    /// # Errors
    /// When it cannot be read or written.
    pub fn service_ca(&self, site: &str) -> Result<CertKey, Error> {
        if self.file("service-ca.crt").exists() {
            return self.cert_key("service-ca");
        }
        let ca = pki::new_named_ca(&format!("{site} service CA"))?;
        self.write_cert_key("service-ca", &ca)?;
        Ok(ca)
    }

    /// Reads the site's configuration.
    ///
    /// # Errors
    /// When there is no site here or it does not parse.
    pub fn config(&self) -> Result<SiteConfig, Error> {
        let path = self.file("site.json");
        if !path.exists() {
            return Err(Error::NoSite {
                path: self.root.clone(),
            });
        }
        self.read_json("site.json")
    }

    /// Reads a certificate and key pair stored as `NAME.crt` and `NAME.key`.
    ///
    /// # Errors
    /// When either file is missing.
    pub fn cert_key(&self, name: &str) -> Result<CertKey, Error> {
        Ok(CertKey {
            cert_pem: read_string(&self.file(&format!("{name}.crt")))?,
            key_pem: read_string(&self.file(&format!("{name}.key")))?,
        })
    }

    /// Writes a certificate (0644) and its key (0600) as `NAME.crt` and `NAME.key`.
    ///
    /// # Errors
    /// When writing fails.
    pub fn write_cert_key(&self, name: &str, pair: &CertKey) -> Result<(), Error> {
        write_atomic(
            &self.file(&format!("{name}.key")),
            pair.key_pem.as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.file(&format!("{name}.crt")),
            pair.cert_pem.as_bytes(),
            0o644,
        )
    }

    /// Reads a JSON file of the state directory, or `T::default()` when it does not exist.
    ///
    /// # Errors
    /// When it exists but cannot be read or parsed.
    pub fn read_json_or_default<T: DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, Error> {
        if self.file(name).exists() {
            self.read_json(name)
        } else {
            Ok(T::default())
        }
    }

    /// Reads and parses a JSON file of the state directory.
    ///
    /// # Errors
    /// When it cannot be read or parsed.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T, Error> {
        let path = self.file(name);
        let text = read_string(&path)?;
        serde_json::from_str(&text).map_err(|source| Error::Parse { path, source })
    }

    /// Writes a JSON file of the state directory atomically, owner-only.
    ///
    /// # Errors
    /// When writing fails.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(value).map_err(|source| Error::Parse {
            path: self.file(name),
            source,
        })?;
        write_atomic(&self.file(name), &text, 0o600)
    }

    /// Removes the whole state directory.
    ///
    /// # Errors
    /// When removal fails.
    pub fn remove(&self) -> Result<(), Error> {
        fs::remove_dir_all(&self.root).map_err(io_error(&self.root))
    }
}

/// The names a router identity certificate carries: the link-access host, and the site name so
/// that a peer can also verify by name.
pub fn router_sans(config: &SiteConfig) -> Vec<String> {
    let mut sans = vec![config.name.clone()];
    if let Some(host) = config.link_access.as_deref().and_then(host_of)
        && !sans.iter().any(|s| s == host)
    {
        sans.push(host.to_owned());
    }
    sans
}

/// The host part of `HOST:PORT` (IPv6 in brackets).
#[must_use]
pub fn host_of(endpoint: &str) -> Option<&str> {
    let (host, _port) = endpoint.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

fn validate_name(name: &str) -> Result<(), Error> {
    if crate::service::is_dns_label(name) {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("skiff-site-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn create_writes_private_keys_and_refuses_to_overwrite() {
        let dir = temp_dir("create");
        let state = StateDir::new(&dir);
        let config = SiteConfig {
            name: "west".into(),
            link_access: Some("127.0.0.1:9090".into()),
            ..SiteConfig::default()
        };
        state.create(&config).expect("create");
        for key in ["ca.key", "router.key"] {
            let mode = fs::metadata(dir.join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert_eq!(state.config().expect("config"), config);
        assert!(matches!(state.create(&config), Err(Error::Exists { .. })));
        state.remove().expect("remove");
    }

    #[test]
    fn lifetimes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_lifetime("90d"), Ok(90 * 86_400));
        assert_eq!(parse_lifetime("12h"), Ok(12 * 3_600));
        assert_eq!(parse_lifetime("30m"), Ok(1_800));
        assert_eq!(parse_lifetime("45s"), Ok(45));
        for bad in [
            "",
            "d",
            "0d",
            "-1d",
            "10",
            "10w",
            "1.5d",
            "99999999999999999999d",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let state = StateDir::new(temp_dir("badname"));
        for name in ["", "West", "a_b", "-x", &"x".repeat(64)] {
            let config = SiteConfig {
                name: name.into(),
                ..SiteConfig::default()
            };
            assert!(
                matches!(state.create(&config), Err(Error::BadName(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn host_of_handles_ipv6_brackets() {
        assert_eq!(host_of("10.0.0.1:80"), Some("10.0.0.1"));
        assert_eq!(host_of("[::1]:80"), Some("::1"));
        assert_eq!(host_of("router.example:443"), Some("router.example"));
    }
}
