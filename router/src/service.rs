//! Services: listeners (a local address that accepts connections for a routing key) and
//! connectors (a routing key bound to a backend address). The field names are those of the
//! YAML resources and CRDs.

use serde::{Deserialize, Serialize};

/// The longest resource name: a DNS label, as Kubernetes names its objects.
pub const MAX_NAME: usize = 63;

/// The longest routing key. Every key a site serves travels in its one LinkState frame: 4,096
/// keys of this length, with as many links, stay under the frame's 1 MiB payload.
pub const MAX_ROUTING_KEY: usize = 128;

/// A resource field that breaks the rules every entry (CLI, YAML, admin API) checks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error(
        "{kind} name {name} is not valid: use 1 to {MAX_NAME} lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    Name { kind: &'static str, name: Shown },
    #[error(
        "routing key {key} of {kind} {name} is not valid: use 1 to {MAX_ROUTING_KEY} letters, digits and any of - . _ : /"
    )]
    RoutingKey {
        kind: &'static str,
        name: String,
        key: Shown,
    },
    #[error("host {host} of {kind} {name} is not valid: give an IP address or a DNS name")]
    Host {
        kind: &'static str,
        name: String,
        host: Shown,
    },
}

/// A value a user gave, quoted, cut short when long, for a one-line error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    fn of(value: &str) -> Self {
        const SHOWN: usize = 40;
        if value.len() <= SHOWN {
            return Self(format!("{value:?}"));
        }
        let mut end = SHOWN;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        Self(format!("{:?}... ({} bytes)", &value[..end], value.len()))
    }
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `name` is a DNS label (RFC 1123) of at most [`MAX_NAME`] bytes: what resource and
/// site names must be, so that they are safe in file names, certificates and the protocol.
#[must_use]
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn check_name(kind: &'static str, name: &str) -> Result<(), Invalid> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(Invalid::Name {
            kind,
            name: Shown::of(name),
        })
    }
}

fn check_key(kind: &'static str, name: &str, key: &str) -> Result<(), Invalid> {
    let ok = !key.is_empty()
        && key.len() <= MAX_ROUTING_KEY
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-._:/".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Invalid::RoutingKey {
            kind,
            name: name.to_owned(),
            key: Shown::of(key),
        })
    }
}

fn check_host(kind: &'static str, name: &str, host: &str) -> Result<(), Invalid> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ok = bare.parse::<std::net::IpAddr>().is_ok()
        || (!bare.is_empty()
            && bare.len() <= 253
            && bare.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= MAX_NAME
                    && label
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            }));
    if ok {
        Ok(())
    } else {
        Err(Invalid::Host {
            kind,
            name: name.to_owned(),
            host: Shown::of(host),
        })
    }
}

/// A local address at this site that accepts TCP connections for a routing key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listener {
    pub name: String,
    /// Address to bind; `0.0.0.0` (every IPv4 address) by default.
    #[serde(default = "any_host")]
    pub host: String,
    pub port: u16,
    pub routing_key: String,
    /// The namespace the listener belongs to (with `--isolate-namespaces`: who may connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Other namespaces that may connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_namespaces: Vec<String>,
    /// Serve TLS to workloads instead of plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// TLS between workloads and a listener: the router presents a certificate from the site's
/// service CA (for the routing key, the listener's name and host, `localhost`, `127.0.0.1`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerTls {
    /// Also require a client certificate signed by the service CA (see `--bundle-out`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// A certificate (PEM file) to serve instead of one from the service CA, with its key;
    /// the user renews it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// The private key (PEM file) of `certFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Application protocols (ALPN ids) offered to clients, in order of preference; the one
    /// a client agrees to is asked of the connector's TLS backend. None by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
}

/// TLS between the router and a backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectorTls {
    /// PEM file of the CA the backend's certificate must chain to; by default the site's
    /// service CA (which signs the bundle `--bundle-out` writes for the backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The name the backend's certificate must carry; by default the connector's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate (PEM file) and key to present to a backend that checks clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// The private key (PEM file) of `certFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// Binds a routing key at this site to a backend `host:port`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Connector {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub routing_key: String,
    /// Connect to the backend over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ConnectorTls>,
}

fn any_host() -> String {
    "0.0.0.0".to_owned()
}

/// Where a listener binds when its host is not given: loopback for a listener that belongs to
/// a namespace (the connect hooks govern only local callers inside `--cgroup`; remote hosts
/// would reach a wildcard bind ungoverned), every IPv4 address otherwise. The CLI and YAML use
/// this; the admin API takes the host it is given.
#[must_use]
pub fn default_listener_host(namespace: Option<&str>) -> String {
    if namespace.is_some() {
        "127.0.0.1".to_owned()
    } else {
        any_host()
    }
}

impl Listener {
    /// Checks the name, routing key and host against the limits the protocol and the state
    /// directory need.
    ///
    /// # Errors
    /// The first field that breaks them.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("listener", &self.name)?;
        check_key("listener", &self.name, &self.routing_key)?;
        check_host("listener", &self.name, &self.host)?;
        for namespace in self.namespace.iter().chain(&self.allow_namespaces) {
            check_name("namespace", namespace)?;
        }
        Ok(())
    }

    /// The address to bind, as `host:port` (IPv6 hosts in brackets).
    #[must_use]
    pub fn bind_addr(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl Connector {
    /// Checks the name, routing key and host, as [`Listener::validate`] does.
    ///
    /// # Errors
    /// The first field that breaks them.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("connector", &self.name)?;
        check_key("connector", &self.name, &self.routing_key)?;
        check_host("connector", &self.name, &self.host)
    }

    /// The backend address, as `host:port` (IPv6 hosts in brackets).
    #[must_use]
    pub fn backend_addr(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Every listener and connector of a site, as stored in `resources.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub connectors: Vec<Connector>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_bracket_ipv6_hosts() {
        let c = Connector {
            name: "db".into(),
            host: "::1".into(),
            port: 5432,
            routing_key: "db".into(),
            tls: None,
        };
        assert_eq!(c.backend_addr(), "[::1]:5432");
        let l: Listener = serde_json::from_str(r#"{"name":"web","port":8080,"routingKey":"web"}"#)
            .expect("parses");
        assert_eq!(l.bind_addr(), "0.0.0.0:8080");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_str::<Listener>(r#"{"name":"w","port":1,"routingKey":"w","prot":1}"#);
        assert!(err.is_err());
    }

    fn connector(name: &str, key: &str, host: &str) -> Connector {
        Connector {
            name: name.into(),
            host: host.into(),
            port: 80,
            routing_key: key.into(),
            tls: None,
        }
    }

    /// The review's names: separators, traversal, NUL, empty, 10,000 characters; a key longer
    /// than fits a LinkState. Each is refused in one line that quotes it, cut short.
    #[test]
    fn names_keys_and_hosts_are_checked_against_the_limits() {
        for bad in ["a/b", "..", "../../x", "a\0b", "", "-a", "a-", "Web", "a.b"] {
            let e = connector(bad, "k", "127.0.0.1").validate().expect_err(bad);
            assert!(matches!(e, Invalid::Name { .. }), "{bad}: {e}");
        }
        let long = "a".repeat(10_000);
        let e = connector(&long, "k", "h").validate().expect_err("long");
        let line = e.to_string();
        assert!(
            line.contains("(10000 bytes)") && line.len() < 300 && !line.contains('\n'),
            "{line}"
        );
        assert!(
            connector(&"a".repeat(MAX_NAME), "k", "h")
                .validate()
                .is_ok()
        );
        assert!(
            connector(&"a".repeat(MAX_NAME + 1), "k", "h")
                .validate()
                .is_err()
        );

        let key = "k".repeat(MAX_ROUTING_KEY + 1);
        assert!(matches!(
            connector("db", &key, "h").validate(),
            Err(Invalid::RoutingKey { .. })
        ));
        for bad in ["", "a b", "k\n", "k\0"] {
            assert!(connector("db", bad, "h").validate().is_err(), "{bad:?}");
        }
        assert!(
            connector("db", "svc.ns:8080/v1_a-b", "h")
                .validate()
                .is_ok()
        );

        for good in ["127.0.0.1", "::1", "[::1]", "db.example.com", "redis-0"] {
            assert!(connector("db", "k", good).validate().is_ok(), "{good}");
        }
        for bad in ["", "a..b", "a/b", "a b", "x\0"] {
            assert!(
                matches!(
                    connector("db", "k", bad).validate(),
                    Err(Invalid::Host { .. })
                ),
                "{bad:?}"
            );
        }
        let mut l: Listener = serde_json::from_str(
            r#"{"name":"web","port":1,"routingKey":"web","namespace":"../x"}"#,
        )
        .expect("parses");
        assert!(l.validate().is_err());
        l.namespace = Some("team-a".into());
        assert!(l.validate().is_ok());
    }
}
