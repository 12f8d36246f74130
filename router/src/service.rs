//! Services: listeners (a local address that accepts connections for a routing key) and
//! connectors (a routing key bound to a backend address). The field names are those of the
//! YAML resources and CRDs.

use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerTls {
    /// Also require a client certificate signed by the service CA (see `--bundle-out`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// A certificate (PEM file) to serve instead of one from the service CA, with its key;
    /// the user renews it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Application protocols (ALPN ids) offered to clients, in order of preference; the one
    /// a client agrees to is asked of the connector's TLS backend. None by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
}

/// TLS between the router and a backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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

impl Listener {
    /// The address to bind, as `host:port` (IPv6 hosts in brackets).
    #[must_use]
    pub fn bind_addr(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl Connector {
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
}
