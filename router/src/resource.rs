//! Declarative resources: the YAML that `skiff apply -f` reads, with the same schema as the
//! CRDs (`apiVersion`, `kind`, `metadata.name`, `spec`). The spec types live in
//! [`kinds`], where kube's derive also makes them the CRDs' schemas ([`crd`]).
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

pub mod crd;
pub mod kinds;
#[cfg(test)]
mod tests;

use serde::Deserialize;

pub use kinds::{
    AccessGrantSpec, AccessTokenSpec, ConnectorSpec, LinkSpec, ListenerSpec, SitePolicySpec,
    SiteSpec,
};

use crate::{
    policy::Policy,
    service::{Connector, Listener, Resources},
    site::SiteConfig,
    token::Token,
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
    #[error("document {index}: `skiff apply` does not apply a {kind} yet; use `{instead}`")]
    NotApplied {
        index: usize,
        kind: &'static str,
        instead: &'static str,
    },
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
        spec: SitePolicySpec,
    },
    Link {
        api_version: String,
        metadata: Metadata,
        spec: LinkSpec,
    },
    AccessGrant {
        api_version: String,
        metadata: Metadata,
        spec: AccessGrantSpec,
    },
    AccessToken {
        api_version: String,
        metadata: Metadata,
        spec: AccessTokenSpec,
    },
}

impl Document {
    fn header(&self) -> (&str, &Metadata) {
        match self {
            Self::Site {
                api_version,
                metadata,
                ..
            }
            | Self::Listener {
                api_version,
                metadata,
                ..
            }
            | Self::Connector {
                api_version,
                metadata,
                ..
            }
            | Self::SitePolicy {
                api_version,
                metadata,
                ..
            }
            | Self::Link {
                api_version,
                metadata,
                ..
            }
            | Self::AccessGrant {
                api_version,
                metadata,
                ..
            }
            | Self::AccessToken {
                api_version,
                metadata,
                ..
            } => (api_version, metadata),
        }
    }
}

/// A parsed and validated resource of a kind that `skiff apply` does not act on yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named<T> {
    /// The document's number in its file, for errors.
    pub index: usize,
    pub name: String,
    pub spec: T,
}

/// What a YAML file declares: at most one site and one policy, listeners and connectors, and
/// links, grants and tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    pub site: Option<SiteConfig>,
    pub policy: Option<Policy>,
    pub resources: Resources,
    /// Parsed and validated; `skiff apply` refuses them (the node controller acts on them).
    pub links: Vec<Named<LinkSpec>>,
    pub grants: Vec<Named<AccessGrantSpec>>,
    pub tokens: Vec<Named<Token>>,
}

impl Declared {
    /// Refuses a file that declares kinds `skiff apply` does not act on, before anything in
    /// it is applied, naming the command that does the same today.
    ///
    /// # Errors
    /// On the first such document.
    pub fn check_applicable(&self) -> Result<(), Error> {
        let first = [
            self.links
                .first()
                .map(|l| (l.index, "Link", "skiff link create")),
            self.grants
                .first()
                .map(|g| (g.index, "AccessGrant", "skiff token issue")),
            self.tokens
                .first()
                .map(|t| (t.index, "AccessToken", "skiff token redeem")),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(index, ..)| *index);
        match first {
            Some((index, kind, instead)) => Err(Error::NotApplied {
                index,
                kind,
                instead,
            }),
            None => Ok(()),
        }
    }
}

/// Parses every YAML document in `text`. Routing keys default to the resource's name; a
/// listener's host defaults to every IPv4 address.
///
/// # Errors
/// On the first document that is not a valid resource, or a second Site.
pub fn parse(text: &str) -> Result<Declared, Error> {
    check_shape(text)?;
    let mut declared = Declared::default();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = index + 1;
        let value = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|source| Error::Parse { index, source })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let doc: Document =
            serde_yaml_ng::from_value(value).map_err(|source| Error::Parse { index, source })?;
        let (api_version, metadata) = doc.header();
        if api_version != API_VERSION {
            return Err(Error::ApiVersion {
                index,
                found: api_version.to_owned(),
            });
        }
        let name = metadata.name.clone();
        add(&mut declared, index, name, doc)?;
    }
    Ok(declared)
}

/// The site a Site resource declares.
///
/// # Errors
/// A one-line reason when `certLifetime` is not a lifetime.
pub fn site_config(name: String, spec: SiteSpec) -> Result<SiteConfig, String> {
    let cert_lifetime_secs = match &spec.cert_lifetime {
        Some(text) => Some(crate::site::parse_lifetime(text)?),
        None => None,
    };
    Ok(SiteConfig {
        name,
        link_access: spec.link_access,
        namespaces: spec.namespaces,
        isolate_namespaces: spec.isolate_namespaces,
        cert_lifetime_secs,
        datapath: spec.datapath,
    })
}

/// The listener a Listener resource declares, named `name` in the router. Its routing key
/// defaults to `key` (the resource's name where the router's name differs) or else `name`;
/// its host to [`crate::service::default_listener_host`].
#[must_use]
pub fn listener(name: String, key: Option<&str>, spec: ListenerSpec) -> Listener {
    Listener {
        routing_key: spec
            .routing_key
            .unwrap_or_else(|| key.unwrap_or(&name).to_owned()),
        host: spec
            .host
            .unwrap_or_else(|| crate::service::default_listener_host(spec.namespace.as_deref())),
        port: spec.port,
        namespace: spec.namespace,
        allow_namespaces: spec.allow_namespaces,
        tls: spec.tls,
        name,
    }
}

/// The connector a Connector resource declares, named `name` in the router; its routing key
/// defaults as [`listener`]'s does.
#[must_use]
pub fn connector(name: String, key: Option<&str>, spec: ConnectorSpec) -> Connector {
    Connector {
        routing_key: spec
            .routing_key
            .unwrap_or_else(|| key.unwrap_or(&name).to_owned()),
        host: spec.host,
        port: spec.port,
        tls: spec.tls,
        name,
    }
}

/// Adds one document's resource to `declared`.
fn add(declared: &mut Declared, index: usize, name: String, doc: Document) -> Result<(), Error> {
    let resources = &mut declared.resources;
    match doc {
        Document::Site { spec, .. } => {
            if declared.site.is_some() {
                return Err(Error::SecondSite { index });
            }
            declared.site =
                Some(site_config(name, spec).map_err(|reason| Error::Field { index, reason })?);
        }
        Document::Listener { spec, .. } => resources.listeners.push(listener(name, None, spec)),
        Document::SitePolicy { spec, .. } => {
            if declared.policy.is_some() {
                return Err(Error::SecondPolicy { index });
            }
            declared.policy = Some(spec.0);
        }
        Document::Connector { spec, .. } => {
            resources.connectors.push(connector(name, None, spec));
        }
        Document::Link { spec, .. } => {
            kinds::validate_link(&name, &spec).map_err(|reason| Error::Field { index, reason })?;
            declared.links.push(Named { index, name, spec });
        }
        Document::AccessGrant { spec, .. } => {
            kinds::validate_grant(&name, &spec).map_err(|reason| Error::Field { index, reason })?;
            declared.grants.push(Named { index, name, spec });
        }
        Document::AccessToken { spec, .. } => {
            kinds::validate_token(&name, &spec.0)
                .map_err(|reason| Error::Field { index, reason })?;
            declared.tokens.push(Named {
                index,
                name,
                spec: spec.0,
            });
        }
    }
    Ok(())
}
