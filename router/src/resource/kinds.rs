//! The resource kinds. Each spec type is at once what `skiff apply -f` parses and, through
//! kube's `CustomResource` derive, the schema of its CRD (`cargo xtask crds` writes them to
//! deploy/kubernetes/crds/), so the CLI, the YAML files and the CRDs cannot drift apart.
//!
//! Every kind is namespaced, in group `skiff.io`, version `v1alpha1`, with a status
//! subresource holding Kubernetes-style conditions. The root types the derive generates
//! (`kinds::Site`, `kinds::Listener`, ...: the whole object with `metadata` and `status`) are
//! for the API side; `skiff apply -f` reads documents with only `metadata.name` (resource.rs).

// Columns of `#[kube(printcolumn(...))]` repeat `type_ = "string"`, which clippy takes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::{borrow::Cow, collections::BTreeMap};

use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::{
    policy::{IncomingLinks, Policy},
    service::{ConnectorTls, ListenerTls},
    token::Token,
};

/// A site: one router, its CA and identity, and the namespaces it serves.
#[derive(
    CustomResource, Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "Site",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "A skiff site: one router with its own CA and identity, and the namespaces it serves."
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SiteSpec {
    /// HOST:PORT where this site accepts links and token redemptions, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_access: Option<String>,
    /// Namespaces of this node: name -> cgroup v2 directory whose subtree is the namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, String>,
    /// Make every listener reachable only from its own namespace and those it allows
    /// (enforced at connect() in the kernel).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolate_namespaces: bool,
    /// Lifetime of the certificates the router issues itself: a number and a unit (d, h, m
    /// or s), e.g. 90d. One year by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[dhms]$"))]
    pub cert_lifetime: Option<String>,
    /// The backend that moves bytes: io_uring (uring), epoll, or io_uring where the kernel
    /// allows it (auto, the default). `router run --datapath` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<crate::datapath::Mode>,
}

/// A local address that accepts TCP connections for a routing key.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "Listener",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(name = "Routing Key", type_ = "string", json_path = ".spec.routingKey"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "A local address at a site that accepts TCP connections for a routing key."
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerSpec {
    /// Address to bind: 127.0.0.1 for a listener with a namespace, 0.0.0.0 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The TCP port to listen on.
    pub port: u16,
    /// The service's address in the network; the resource's name by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// The namespace the listener belongs to: with isolation, only its workloads may connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Other namespaces whose workloads may connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_namespaces: Vec<String>,
    /// Serve TLS to workloads instead of plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// Binds a routing key at a site to a backend host:port.
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(name = "Routing Key", type_ = "string", json_path = ".spec.routingKey"),
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "Binds a routing key at a site to a backend host:port."
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// The backend's IP address or DNS name.
    pub host: String,
    /// The backend's TCP port.
    pub port: u16,
    /// The service's address in the network; the resource's name by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// Connect to the backend over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ConnectorTls>,
}

/// Which sites may link in, which hosts links may go out to, which backends may be exposed
/// and which routing keys are allowed; whatever a control does not name is denied.
// The spec is `Policy` itself (a newtype keeps the policy module free of Kubernetes).
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "SitePolicy",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "A site's policy: an allow list over incoming links, outgoing link hosts, exposed backends and routing keys."
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct SitePolicySpec(pub Policy);

/// A link to another site, from a credential obtained out of band (as `skiff link create`).
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "Link",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(name = "Peer", type_ = "string", json_path = ".spec.peerSite"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "A mutually authenticated TLS link from this site to another site's link-access endpoint."
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LinkSpec {
    /// HOST:PORT of the peer site's link-access endpoint.
    pub url: String,
    /// The peer's site name: its router certificate must carry it.
    pub peer_site: String,
    /// Routing cost of the link; traffic prefers cheaper paths. 1 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub cost: Option<u32>,
    /// The Secret in this namespace that holds the link credential: tls.crt and tls.key
    /// (signed by the peer's site CA) and ca.crt (the peer's site CA, the only one trusted).
    pub tls_credentials: String,
}

/// Permission for other sites to redeem tokens for links to this site.
#[derive(
    CustomResource, Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "AccessGrant",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(
        name = "Redemptions Allowed",
        type_ = "integer",
        json_path = ".spec.redemptionsAllowed"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "Permission to redeem access tokens for links to this site, a limited number of times within a window."
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessGrantSpec {
    /// How many times tokens from this grant may be redeemed; 1 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub redemptions_allowed: Option<u32>,
    /// How long the grant stays redeemable: a number and a unit (s, m, h or d), at most 365d;
    /// 15m by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+[smhd]?$"))]
    pub expiration_window: Option<String>,
}

/// A token to redeem for a link: the contents of the file `skiff token issue` writes.
// The spec is `Token` itself (a newtype keeps the token module free of Kubernetes).
#[derive(CustomResource, Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "skiff.io",
    version = "v1alpha1",
    kind = "AccessToken",
    namespaced,
    status = "Status",
    category = "skiff",
    printcolumn(name = "Issuer", type_ = "string", json_path = ".spec.site"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    doc = "A short-lived token that a site redeems at the issuing site for a link credential."
)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct AccessTokenSpec(pub Token);

/// What the node controller reports about a resource.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The latest observations of the resource's state; `Ready` says whether it is in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One observation, shaped as Kubernetes' own `metav1.Condition`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What is observed, in CamelCase: `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// Why, in one CamelCase word (`Applied`, `Refused`, `PolicyDenied`).
    pub reason: String,
    /// Why, for a person: one line.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The `metadata.generation` this condition describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A condition's status, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// `allowIncomingLinks` is `true`, `false` or a list of site names. A structural schema cannot
/// say "boolean or list" (Kubernetes allows no `type` inside `anyOf`), so the API server keeps
/// the value as given and skiff checks its shape when it parses the resource. (The field's
/// own doc comment in policy.rs is its description.)
impl JsonSchema for IncomingLinks {
    fn schema_name() -> Cow<'static, str> {
        "IncomingLinks".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// The longest Kubernetes object name (a DNS subdomain): what a Secret's name may be.
const MAX_OBJECT_NAME: usize = 253;

/// Checks a Link beyond its schema: what `skiff link create` would refuse.
///
/// # Errors
/// A one-line reason.
pub fn validate_link(name: &str, spec: &LinkSpec) -> Result<(), String> {
    check_name("Link", name)?;
    check_endpoint("Link", name, &spec.url)?;
    if !crate::service::is_dns_label(&spec.peer_site) {
        return Err(format!(
            "Link {name}: peerSite {:?} is not a site name (a DNS label)",
            spec.peer_site
        ));
    }
    if spec.cost == Some(0) {
        return Err(format!("Link {name}: cost must be at least 1"));
    }
    let secret = &spec.tls_credentials;
    let subdomain = !secret.is_empty()
        && secret.len() <= MAX_OBJECT_NAME
        && secret.split('.').all(crate::service::is_dns_label);
    if !subdomain {
        return Err(format!(
            "Link {name}: tlsCredentials {secret:?} is not a Secret name"
        ));
    }
    Ok(())
}

/// Checks an AccessGrant with the limits `skiff token issue` applies.
///
/// # Errors
/// A one-line reason.
pub fn validate_grant(name: &str, spec: &AccessGrantSpec) -> Result<(), String> {
    check_name("AccessGrant", name)?;
    let redemptions = spec
        .redemptions_allowed
        .unwrap_or(crate::token::DEFAULT_REDEMPTIONS);
    let expiry = match &spec.expiration_window {
        Some(text) => crate::token::parse_duration(text)
            .map_err(|reason| format!("AccessGrant {name}: expirationWindow: {reason}"))?,
        None => crate::token::DEFAULT_EXPIRY,
    };
    crate::token::Grant::new(String::new(), redemptions, expiry.as_secs())
        .map(drop)
        .map_err(|e| format!("AccessGrant {name}: {e}"))
}

/// Checks an AccessToken: a token file as `skiff token redeem` reads it.
///
/// # Errors
/// A one-line reason.
pub fn validate_token(name: &str, token: &Token) -> Result<(), String> {
    check_name("AccessToken", name)?;
    check_endpoint("AccessToken", name, &token.url)?;
    if token.grant.is_empty() || token.code.is_empty() {
        return Err(format!(
            "AccessToken {name}: grant and code must not be empty"
        ));
    }
    if !crate::service::is_dns_label(&token.site) {
        return Err(format!(
            "AccessToken {name}: site {:?} is not a site name (a DNS label)",
            token.site
        ));
    }
    if !token.ca.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("AccessToken {name}: ca is not a PEM certificate"));
    }
    Ok(())
}

fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if crate::service::is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} is not valid: use 1 to {} lowercase letters, digits and '-'",
            crate::service::MAX_NAME
        ))
    }
}

/// `HOST:PORT`, IPv6 in brackets, with a port that is a number other than 0.
fn check_endpoint(kind: &str, name: &str, url: &str) -> Result<(), String> {
    let port = url.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
    let host = crate::site::host_of(url).unwrap_or_default();
    if matches!(port, Some(Ok(p)) if p != 0) && !host.is_empty() {
        Ok(())
    } else {
        Err(format!("{kind} {name}: url {url:?} is not HOST:PORT"))
    }
}
