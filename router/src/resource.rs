//! Declarative resources: the YAML form of listeners and connectors that `skiff apply -f`
//! reads, with the same schema as the CRDs (`apiVersion`, `kind`, `metadata.name`, `spec`).
//!
//! ```yaml
//! apiVersion: skiff.io/v1alpha1
//! kind: Listener
//! metadata: {name: web}
//! spec: {port: 8080, routingKey: web}
//! ---
//! apiVersion: skiff.io/v1alpha1
//! kind: Connector
//! metadata: {name: web}
//! spec: {host: 127.0.0.1, port: 8080}
//! ---
//! apiVersion: skiff.io/v1alpha1
//! kind: SitePolicy
//! metadata: {name: policy}
//! spec: {allowIncomingLinks: [east], allowedServices: [web]}
//! ```

use serde::Deserialize;

use crate::{
    policy::Policy,
    service::{Connector, ConnectorTls, Listener, ListenerTls, Resources},
    site::SiteConfig,
};

/// The API group and version every resource carries.
pub const API_VERSION: &str = "skiff.io/v1alpha1";

/// A YAML file that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {index} is not valid YAML for a skiff resource")]
    Parse {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {index}: apiVersion {found:?} is not {API_VERSION}")]
    ApiVersion { index: usize, found: String },
    #[error("document {index}: a file declares at most one Site")]
    SecondSite { index: usize },
    #[error("document {index}: a file declares at most one SitePolicy")]
    SecondPolicy { index: usize },
    #[error("document {index}: {reason}")]
    Field { index: usize, reason: String },
    #[error("the file is {0} bytes; resource files may have at most {MAX_TEXT}")]
    TooLarge(usize),
    #[error("the file nests collections more than {MAX_DEPTH} deep")]
    TooDeep,
}

/// The largest resource file taken (the admin socket takes requests up to 1 MiB too).
pub const MAX_TEXT: usize = 1 << 20;
/// How deep flow collections (`[`, `{`) may nest: resources need a few levels, and the YAML
/// parser spends time out of all proportion on deep ones (200 KB of `[` took a minute).
pub const MAX_DEPTH: usize = 64;

/// Refuses text the parser should not be given: too long, or nested too deep. Block nesting
/// is bounded by the text's length; flow nesting is counted outside quoted scalars.
fn check_shape(text: &str) -> Result<(), Error> {
    if text.len() > MAX_TEXT {
        return Err(Error::TooLarge(text.len()));
    }
    let (mut depth, mut quote) = (0usize, None);
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Error::TooDeep);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            (None, '\n') => {}
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListenerSpec {
    #[serde(default)]
    host: Option<String>,
    port: u16,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    allow_namespaces: Vec<String>,
    #[serde(default)]
    tls: Option<ListenerTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConnectorSpec {
    host: String,
    port: u16,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    tls: Option<ConnectorTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SiteSpec {
    #[serde(default)]
    link_access: Option<String>,
    #[serde(default)]
    namespaces: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    isolate_namespaces: bool,
    /// `90d`, `12h`, ...
    #[serde(default)]
    cert_lifetime: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields, rename_all_fields = "camelCase")]
enum Document {
    Site {
        api_version: String,
        metadata: Metadata,
        spec: SiteSpec,
    },
    Listener {
        api_version: String,
        metadata: Metadata,
        spec: ListenerSpec,
    },
    Connector {
        api_version: String,
        metadata: Metadata,
        spec: ConnectorSpec,
    },
    SitePolicy {
        api_version: String,
        metadata: Metadata,
        spec: Policy,
    },
}

/// What a YAML file declares: at most one site and one policy, and listeners and connectors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    pub site: Option<SiteConfig>,
    pub policy: Option<Policy>,
    pub resources: Resources,
}

/// Parses every YAML document in `text`. Routing keys default to the resource's name; a
/// listener's host defaults to every IPv4 address.
///
/// # Errors
/// On the first document that is not a valid resource, or a second Site.
pub fn parse(text: &str) -> Result<Declared, Error> {
    check_shape(text)?;
    let mut declared = Declared::default();
    let resources = &mut declared.resources;
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = index + 1;
        let value = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|source| Error::Parse { index, source })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let doc: Document =
            serde_yaml_ng::from_value(value).map_err(|source| Error::Parse { index, source })?;
        let (api_version, name) = match &doc {
            Document::Site {
                api_version,
                metadata,
                ..
            }
            | Document::Listener {
                api_version,
                metadata,
                ..
            }
            | Document::Connector {
                api_version,
                metadata,
                ..
            }
            | Document::SitePolicy {
                api_version,
                metadata,
                ..
            } => (api_version, &metadata.name),
        };
        if api_version != API_VERSION {
            return Err(Error::ApiVersion {
                index,
                found: api_version.clone(),
            });
        }
        let name = name.clone();
        match doc {
            Document::Site { spec, .. } => {
                if declared.site.is_some() {
                    return Err(Error::SecondSite { index });
                }
                let cert_lifetime_secs = match &spec.cert_lifetime {
                    Some(text) => Some(
                        crate::site::parse_lifetime(text)
                            .map_err(|reason| Error::Field { index, reason })?,
                    ),
                    None => None,
                };
                declared.site = Some(SiteConfig {
                    name,
                    link_access: spec.link_access,
                    namespaces: spec.namespaces,
                    isolate_namespaces: spec.isolate_namespaces,
                    cert_lifetime_secs,
                });
            }
            Document::Listener { spec, .. } => resources.listeners.push(Listener {
                routing_key: spec.routing_key.unwrap_or_else(|| name.clone()),
                host: spec.host.unwrap_or_else(|| {
                    crate::service::default_listener_host(spec.namespace.as_deref())
                }),
                port: spec.port,
                namespace: spec.namespace,
                allow_namespaces: spec.allow_namespaces,
                tls: spec.tls,
                name,
            }),
            Document::SitePolicy { spec, .. } => {
                if declared.policy.is_some() {
                    return Err(Error::SecondPolicy { index });
                }
                declared.policy = Some(spec);
            }
            Document::Connector { spec, .. } => resources.connectors.push(Connector {
                routing_key: spec.routing_key.unwrap_or_else(|| name.clone()),
                host: spec.host,
                port: spec.port,
                tls: spec.tls,
                name,
            }),
        }
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The review's 200 KB of nested `[` took 63 s of CPU in the parser; it is refused before
    /// the parser sees it, as is a file past the size limit. Quoted brackets do not count.
    #[test]
    fn deep_or_huge_files_are_refused_before_parsing() {
        assert!(matches!(
            parse(&"[".repeat(200_000)),
            Err(Error::TooLarge(_) | Error::TooDeep)
        ));
        assert!(matches!(parse(&"[".repeat(65)), Err(Error::TooDeep)));
        assert!(matches!(
            parse(&"#".repeat(MAX_TEXT + 1)),
            Err(Error::TooLarge(_))
        ));
        let quoted = format!(
            "apiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {{name: web}}\nspec: {{port: 1, routingKey: \"{}\"}}\n",
            "[".repeat(100)
        );
        assert!(!matches!(parse(&quoted), Err(Error::TooDeep)));
    }

    /// A listener that belongs to a namespace binds loopback unless told otherwise: the
    /// connect hooks govern local callers in `--cgroup`, never remote hosts.
    #[test]
    fn namespace_listeners_default_to_loopback() {
        let text = "apiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {name: web}\nspec: {port: 1, namespace: team}\n---\napiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {name: open}\nspec: {port: 2}\n";
        let r = parse(text).expect("parses").resources;
        assert_eq!(r.listeners[0].host, "127.0.0.1");
        assert_eq!(r.listeners[1].host, "0.0.0.0");
    }

    #[test]
    fn parses_several_documents_with_defaults() {
        let text = "apiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {name: web}\nspec: {port: 8080}\n---\napiVersion: skiff.io/v1alpha1\nkind: Connector\nmetadata: {name: db}\nspec: {host: 10.0.0.5, port: 5432, routingKey: pg}\n---\n";
        let r = parse(text).expect("parses").resources;
        assert_eq!(r.listeners.len(), 1);
        assert_eq!(r.listeners[0].routing_key, "web");
        assert_eq!(r.listeners[0].host, "0.0.0.0");
        assert_eq!(r.connectors[0].routing_key, "pg");
        assert_eq!(r.connectors[0].backend_addr(), "10.0.0.5:5432");
    }

    #[test]
    fn a_site_with_namespaces_parses_once() {
        let site = "apiVersion: skiff.io/v1alpha1\nkind: Site\nmetadata: {name: west}\nspec:\n  isolateNamespaces: true\n  namespaces: {team-a: /sys/fs/cgroup/a}\n";
        let declared = parse(site).expect("parses");
        let config = declared.site.expect("site");
        assert_eq!(config.name, "west");
        assert!(config.isolate_namespaces);
        assert_eq!(config.namespaces["team-a"], "/sys/fs/cgroup/a");
        let twice = format!("{site}---\n{site}");
        assert!(matches!(parse(&twice), Err(Error::SecondSite { index: 2 })));
    }

    #[test]
    fn a_site_policy_parses_with_unnamed_controls_denying() {
        let text = "apiVersion: skiff.io/v1alpha1\nkind: SitePolicy\nmetadata: {name: strict}\nspec:\n  allowIncomingLinks: [east]\n  allowedServices: ['web-*']\n";
        let policy = parse(text).expect("parses").policy.expect("policy");
        assert!(policy.incoming_link("east").is_ok());
        assert!(policy.service("web-1").is_ok());
        assert!(policy.outgoing_link("anywhere").is_err());
        let typo = text.replace("allowedServices", "allowedService");
        assert!(parse(&typo).is_err());
    }

    #[test]
    fn typos_and_wrong_versions_are_refused_with_the_document_number() {
        let typo = "apiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {name: web}\nspec: {prot: 8080}\n";
        let err = parse(typo).expect_err("unknown field");
        assert!(err.to_string().contains("document 1"), "{err}");
        let version = "apiVersion: skiff.io/v2\nkind: Connector\nmetadata: {name: x}\nspec: {host: h, port: 1}\n";
        assert!(matches!(
            parse(version),
            Err(Error::ApiVersion { index: 1, .. })
        ));
        let kind = "apiVersion: skiff.io/v1alpha1\nkind: Gateway\nmetadata: {name: x}\nspec: {}\n";
        assert!(parse(kind).is_err());
    }
}
