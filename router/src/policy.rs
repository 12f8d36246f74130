//! Site policy: Skupper's four controls over what a site may do.
//!
//! A site without a policy allows everything. Once a policy is applied, it is an allow list:
//! whatever a control does not name is denied (as in Skupper, where a field left out of a
//! policy allows nothing).
//!
//! | control | checked when |
//! |---|---|
//! | `allowIncomingLinks` | a link is accepted, a token is redeemed here |
//! | `allowedOutgoingLinksHostnames` | a link is dialled, a token is redeemed elsewhere |
//! | `allowedExposedResources` | a connector is created (its backend) |
//! | `allowedServices` | a listener or connector is created, a stream is opened |
//!
//! Patterns are matched whole; `*` matches any run of characters (`*.example.com`,
//! `10.0.0.*`, `db-*`, `*`).

use serde::{Deserialize, Serialize};

/// Which sites may link to this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IncomingLinks {
    /// `true`: any site holding a credential from this site's CA; `false`: none.
    All(bool),
    /// Only these sites (names as their certificates give them).
    Sites(Vec<String>),
}

impl Default for IncomingLinks {
    fn default() -> Self {
        Self::All(false)
    }
}

/// A site's policy, as `skiff apply` reads it (`kind: SitePolicy`, also the CRD's spec) and the
/// state directory keeps it (`policy.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Which sites may link to this one: `true` (any site holding a credential from this
    /// site's CA), `false` (none), or a list of site names.
    #[serde(default)]
    pub allow_incoming_links: IncomingLinks,
    /// Host patterns this site may dial links to.
    #[serde(default)]
    pub allowed_outgoing_links_hostnames: Vec<String>,
    /// Backend patterns connectors may point at, matched against `host` and `host:port`.
    #[serde(default)]
    pub allowed_exposed_resources: Vec<String>,
    /// Routing-key patterns that may be exposed (connectors) or consumed (listeners).
    #[serde(default)]
    pub allowed_services: Vec<String>,
}

/// The four controls, as named in logs, errors and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Control {
    IncomingLinks,
    OutgoingLinks,
    ExposedResources,
    Services,
}

impl Control {
    /// The policy field's name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IncomingLinks => "allowIncomingLinks",
            Self::OutgoingLinks => "allowedOutgoingLinksHostnames",
            Self::ExposedResources => "allowedExposedResources",
            Self::Services => "allowedServices",
        }
    }

    pub const ALL: [Self; 4] = [
        Self::IncomingLinks,
        Self::OutgoingLinks,
        Self::ExposedResources,
        Self::Services,
    ];
}

/// Something a policy does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} is not allowed by the site policy ({})", control.as_str())]
pub struct Denied {
    pub control: Control,
    pub what: String,
}

impl Policy {
    /// May site `site` link to this one?
    ///
    /// # Errors
    /// When the policy does not allow it.
    pub fn incoming_link(&self, site: &str) -> Result<(), Denied> {
        let allowed = match &self.allow_incoming_links {
            IncomingLinks::All(all) => *all,
            IncomingLinks::Sites(sites) => sites.iter().any(|s| s == site),
        };
        allow(allowed, Control::IncomingLinks, || {
            format!("a link from site {site}")
        })
    }

    /// May this site dial a link to `host`?
    ///
    /// # Errors
    /// When the policy does not allow it.
    pub fn outgoing_link(&self, host: &str) -> Result<(), Denied> {
        let is_ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok();
        // An address pattern never matches a hostname that merely starts like an address.
        let allowed = self
            .allowed_outgoing_links_hostnames
            .iter()
            .any(|p| (is_ip || !names_addresses(p)) && glob(p, host));
        allow(allowed, Control::OutgoingLinks, || {
            format!("a link to {host}")
        })
    }

    /// May a connector expose the backend at `host`:`port`? Patterns that name addresses
    /// (`10.0.0.*`, `fd00::*`, with or without `:PORT`) match addresses only: `host` when it is
    /// an IP literal, else `resolved`, the address the router is about to connect to (at
    /// create time there is none, and a hostname passes only a hostname pattern).
    ///
    /// # Errors
    /// When the policy does not allow it.
    pub fn exposed_resource(
        &self,
        host: &str,
        port: u16,
        resolved: Option<std::net::IpAddr>,
    ) -> Result<(), Denied> {
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .ok();
        let address = literal.or(resolved).map(|ip| ip.to_string());
        let allowed = self.allowed_exposed_resources.iter().any(|p| {
            let text = if names_addresses(p) {
                match &address {
                    Some(ip) => ip.as_str(),
                    None => return false,
                }
            } else {
                host
            };
            glob(p, text) || glob(p, &crate::service::join_host_port(text, port))
        });
        allow(allowed, Control::ExposedResources, || {
            let addr = crate::service::join_host_port(host, port);
            match resolved {
                Some(ip) if literal.is_none() => format!("backend {addr} (at {ip})"),
                _ => format!("backend {addr}"),
            }
        })
    }

    /// May routing key `key` be exposed or consumed here?
    ///
    /// # Errors
    /// When the policy does not allow it.
    pub fn service(&self, key: &str) -> Result<(), Denied> {
        let allowed = matches_any(&self.allowed_services, key);
        allow(allowed, Control::Services, || format!("routing key {key}"))
    }
}

fn allow(allowed: bool, control: Control, what: impl FnOnce() -> String) -> Result<(), Denied> {
    if allowed {
        Ok(())
    } else {
        Err(Denied {
            control,
            what: what(),
        })
    }
}

fn matches_any(patterns: &[String], text: &str) -> bool {
    patterns.iter().any(|p| glob(p, text))
}

/// Whether `pattern` names addresses rather than hostnames: an IPv6 shape (brackets or two
/// colons), or four dot-separated labels of digits and `*` with at least one digit, either
/// optionally followed by `:PORT`. `*` alone names everything, hostnames included.
fn names_addresses(pattern: &str) -> bool {
    if pattern.starts_with('[') || pattern.matches(':').count() >= 2 {
        return true;
    }
    let host = match pattern.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit() || b == b'*') => host,
        _ => pattern,
    };
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() == 4
        && host.bytes().any(|b| b.is_ascii_digit())
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit() || b == b'*'))
}

/// Whole-string match where `*` matches any run of characters (including none).
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: the prefix was the whole pattern
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The policy in force and what it has denied: one per router, shared by everything that
/// admits a link, a resource or a stream.
#[derive(Debug, Default)]
pub struct Gate {
    /// `None` (no policy applied) allows everything.
    policy: std::sync::RwLock<Option<Policy>>,
    denials: std::sync::Mutex<Denials>,
}

/// Denials, counted per control, with the per-connection ones' logs rate-limited.
#[derive(Debug, Default)]
struct Denials {
    by_control: std::collections::BTreeMap<Control, u64>,
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

impl Gate {
    /// A gate enforcing `policy` (`None`: allow everything).
    #[must_use]
    pub fn new(policy: Option<Policy>) -> Self {
        Self {
            policy: std::sync::RwLock::new(policy),
            denials: std::sync::Mutex::default(),
        }
    }

    /// Runs `check` against the policy in force; no policy allows everything.
    ///
    /// # Errors
    /// What `check` returns.
    pub fn check(&self, check: impl FnOnce(&Policy) -> Result<(), Denied>) -> Result<(), Denied> {
        match &*self.policy.read().expect("policy lock") {
            Some(policy) => check(policy),
            None => Ok(()),
        }
    }

    /// [`Gate::check`], and a denial is counted and logged ([`Gate::denied`]).
    ///
    /// # Errors
    /// What `check` returns.
    pub fn admit(
        &self,
        frequent: bool,
        check: impl FnOnce(&Policy) -> Result<(), Denied>,
    ) -> Result<(), Denied> {
        self.check(check)
            .inspect_err(|denied| self.denied(denied, frequent))
    }

    /// Counts and logs a denial. Per-connection denials (`frequent`) are logged at most once
    /// a second, with the number left unlogged, so a client retrying in a loop cannot flood
    /// the log.
    pub fn denied(&self, denied: &Denied, frequent: bool) {
        let mut d = self.denials.lock().expect("denials lock");
        *d.by_control.entry(denied.control).or_default() += 1;
        let now = std::time::Instant::now();
        if frequent
            && d.last_log
                .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
        {
            d.unlogged += 1;
            return;
        }
        d.last_log = Some(now);
        let unlogged = std::mem::take(&mut d.unlogged);
        tracing::warn!(
            control = denied.control.as_str(),
            unlogged,
            "denied: {denied}"
        );
    }

    /// Puts `policy` in force (`None` removes it).
    pub fn set(&self, policy: Option<Policy>) {
        *self.policy.write().expect("policy lock") = policy;
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> Option<Policy> {
        self.policy.read().expect("policy lock").clone()
    }

    /// Denials so far, per control (every control listed, zero included).
    #[must_use]
    pub fn denials(&self) -> Vec<(Control, u64)> {
        let d = self.denials.lock().expect("denials lock");
        Control::ALL
            .iter()
            .map(|c| (*c, d.by_control.get(c).copied().unwrap_or(0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_strings() {
        assert!(glob("*", ""));
        assert!(glob("*", "anything"));
        assert!(glob("db", "db"));
        assert!(!glob("db", "db2"));
        assert!(glob("db-*", "db-main"));
        assert!(!glob("db-*", "xdb-main"));
        assert!(glob("*.example.com", "a.example.com"));
        assert!(!glob("*.example.com", "example.com"));
        assert!(glob("10.0.*.5", "10.0.7.5"));
        assert!(!glob("10.0.*.5", "10.0.7.50"));
        assert!(glob("a*b*c", "abc"));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(!glob("a*b*c", "acb"));
        // The suffix may not overlap what the middle consumed.
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn an_applied_policy_denies_what_it_does_not_name() {
        let empty = Policy::default();
        assert!(empty.incoming_link("east").is_err());
        assert!(empty.outgoing_link("10.0.0.1").is_err());
        assert!(empty.exposed_resource("10.0.0.1", 80, None).is_err());
        let err = empty.service("web").expect_err("denied");
        assert_eq!(
            err.to_string(),
            "routing key web is not allowed by the site policy (allowedServices)"
        );
    }

    #[test]
    fn each_control_allows_what_it_names() {
        let policy: Policy = serde_json::from_str(
            r#"{"allowIncomingLinks": ["east"], "allowedOutgoingLinksHostnames": ["*.corp"],
                "allowedExposedResources": ["10.0.0.*", "127.0.0.1:6379"],
                "allowedServices": ["web", "db-*"]}"#,
        )
        .expect("parses");
        assert!(policy.incoming_link("east").is_ok());
        assert!(policy.incoming_link("west").is_err());
        assert!(policy.outgoing_link("hub.corp").is_ok());
        assert!(policy.outgoing_link("hub.example").is_err());
        assert!(policy.exposed_resource("10.0.0.9", 5432, None).is_ok());
        assert!(policy.exposed_resource("127.0.0.1", 6379, None).is_ok());
        assert!(policy.exposed_resource("127.0.0.1", 6380, None).is_err());
        assert!(policy.service("db-main").is_ok());
        assert!(policy.service("cache").is_err());
        let open: Policy = serde_json::from_str(r#"{"allowIncomingLinks": true}"#).expect("parses");
        assert!(open.incoming_link("anyone").is_ok());
    }

    /// The review's look-alike: `10.0.0.*` matched the hostname `10.0.0.9.example.com`.
    /// Address patterns match addresses only, a hostname's resolved one where there is one.
    #[test]
    fn address_patterns_match_addresses_not_hostnames_that_look_like_them() {
        let policy: Policy = serde_json::from_str(
            r#"{"allowedOutgoingLinksHostnames": ["10.0.0.*", "*.corp"],
                "allowedExposedResources": ["10.0.0.*", "fd00::*", "db.corp", "127.0.0.1:*"]}"#,
        )
        .expect("parses");
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().expect("ip"));
        assert!(
            policy
                .exposed_resource("10.0.0.9.example.com", 80, None)
                .is_err()
        );
        assert!(
            policy
                .exposed_resource("10.0.0.9.example.com", 80, ip("192.0.2.1"))
                .is_err()
        );
        assert!(policy.exposed_resource("10.0.0.9", 80, None).is_ok());
        assert!(policy.exposed_resource("fd00::5", 80, None).is_ok());
        assert!(policy.exposed_resource("[fd00::5]", 80, None).is_ok());
        assert!(policy.exposed_resource("127.0.0.1", 1234, None).is_ok());
        // A hostname pattern is the name; an address pattern is what it resolves to.
        assert!(
            policy
                .exposed_resource("db.corp", 5432, ip("192.0.2.7"))
                .is_ok()
        );
        assert!(
            policy
                .exposed_resource("cache.example", 1, ip("10.0.0.3"))
                .is_ok()
        );
        assert!(
            policy
                .exposed_resource("cache.example", 1, ip("192.0.2.3"))
                .is_err()
        );
        assert!(policy.outgoing_link("10.0.0.9.example.com").is_err());
        assert!(policy.outgoing_link("10.0.0.9").is_ok());
        assert!(policy.outgoing_link("hub.corp").is_ok());
        for (p, names) in [
            ("10.0.0.*", true),
            ("10.*.*.*:8080", true),
            ("[fd00::1]:80", true),
            ("fd00::*", true),
            ("*", false),
            ("*.corp", false),
            ("10.0.0.9.example.com", false),
            ("db", false),
        ] {
            assert_eq!(names_addresses(p), names, "{p}");
        }
    }
}
