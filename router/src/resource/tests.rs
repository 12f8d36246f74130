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
    let version =
        "apiVersion: skiff.io/v2\nkind: Connector\nmetadata: {name: x}\nspec: {host: h, port: 1}\n";
    assert!(matches!(
        parse(version),
        Err(Error::ApiVersion { index: 1, .. })
    ));
    let kind = "apiVersion: skiff.io/v1alpha1\nkind: Gateway\nmetadata: {name: x}\nspec: {}\n";
    assert!(parse(kind).is_err());
}

const CA: &str = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n";

fn doc(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: skiff.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

#[test]
fn links_grants_and_tokens_parse_with_their_defaults() {
    let text = [
        doc(
            "Link",
            "to-east",
            "{url: 'east.example.net:55671', peerSite: east, tlsCredentials: skiff-link-east}",
        ),
        doc("AccessGrant", "invite", "{}"),
        doc(
            "AccessGrant",
            "team",
            "{redemptionsAllowed: 3, expirationWindow: 2h}",
        ),
        doc(
            "AccessToken",
            "from-west",
            &format!("{{url: '[fd00::1]:55671', grant: g1, code: c0de, site: west, ca: \"{CA}\"}}"),
        ),
    ]
    .join("---\n");
    let declared = parse(&text).expect("parses");
    assert_eq!(declared.links[0].spec.peer_site, "east");
    assert_eq!(declared.links[0].spec.cost, None);
    assert_eq!(declared.grants.len(), 2);
    assert_eq!(declared.grants[1].spec.redemptions_allowed, Some(3));
    assert_eq!(declared.tokens[0].spec.site, "west");
    assert_eq!(declared.tokens[0].index, 4);
    // Nothing applies them yet: a file with one is refused before anything in it is applied,
    // naming the first such document and the command that does it today.
    let err = declared.check_applicable().expect_err("not applied");
    assert!(
        matches!(
            err,
            Error::NotApplied {
                index: 1,
                kind: "Link",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("skiff link create"), "{err}");
    let plain = parse(&doc("Listener", "web", "{port: 80}")).expect("parses");
    assert!(plain.check_applicable().is_ok());
}

#[test]
fn grants_outside_the_token_limits_are_refused() {
    for spec in [
        "{redemptionsAllowed: 0}",
        "{redemptionsAllowed: 1001}",
        "{expirationWindow: 0s}",
        "{expirationWindow: 366d}",
        "{expirationWindow: soon}",
    ] {
        let err = parse(&doc("AccessGrant", "g", spec)).expect_err(spec);
        assert!(
            matches!(err, Error::Field { index: 1, .. }),
            "{spec}: {err}"
        );
    }
    assert!(
        parse(&doc(
            "AccessGrant",
            "g",
            "{redemptionsAllowed: 1000, expirationWindow: 365d}"
        ))
        .is_ok()
    );
}

#[test]
fn malformed_links_and_tokens_are_refused() {
    let link = |spec: &str| parse(&doc("Link", "l", spec));
    assert!(link("{url: 'h:1', peerSite: east, tlsCredentials: s}").is_ok());
    for bad in [
        "{url: 'h', peerSite: east, tlsCredentials: s}",
        "{url: 'h:0', peerSite: east, tlsCredentials: s}",
        "{url: ':1', peerSite: east, tlsCredentials: s}",
        "{url: 'h:1', peerSite: East, tlsCredentials: s}",
        "{url: 'h:1', peerSite: east, tlsCredentials: s, cost: 0}",
        "{url: 'h:1', peerSite: east, tlsCredentials: 'a/b'}",
        "{url: 'h:1', peerSite: east}",
        "{url: 'h:1', peerSite: east, tlsCredential: s}",
    ] {
        assert!(link(bad).is_err(), "{bad}");
    }
    let token = |spec: String| parse(&doc("AccessToken", "t", &spec));
    let good = format!("{{url: 'h:1', grant: g, code: c, site: west, ca: \"{CA}\"}}");
    assert!(token(good.clone()).is_ok());
    for bad in [
        good.replace("'h:1'", "'h'"),
        good.replace("code: c", "code: ''"),
        good.replace("site: west", "site: West_1"),
        good.replace(CA, "not a certificate"),
        good.replace("grant: g", "grant: g, linkCost: 1"),
    ] {
        assert!(token(bad.clone()).is_err(), "{bad}");
    }
    assert!(parse(&doc("AccessGrant", "Bad_Name", "{}")).is_err());
}

/// The example resources in deploy/kubernetes/examples are what `skiff apply -f` takes too
/// (`cargo xtask lint` checks them against the CRDs' schemas).
#[test]
fn the_kubernetes_examples_parse_as_skiff_resources() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples exist") {
        let path = entry.expect("readable").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        let declared = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_ne!(declared, Declared::default(), "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 5, "{seen} examples");
}
