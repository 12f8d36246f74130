//! `skiff network status --output dot|svg`: the network as this site sees it, as a Graphviz
//! graph. Sites are boxes, links are edges labelled with their cost (and, for this site's own
//! links, their state and round-trip time), routing keys are ellipses with an edge to each site
//! that has a connector for them, and this site's listeners point at the key they serve.

use std::{collections::BTreeSet, fmt::Write as _};

use serde_json::Value;

/// The graph, from the answers to `NetworkStatus`, `LinkStatus` and `ListenerStatus` of site
/// `me`.
#[must_use]
pub fn dot(me: &str, network: &Value, links: &Value, listeners: &Value) -> String {
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let mut out = String::from(
        "digraph skiff {\n  rankdir=LR;\n  node [fontname=\"sans-serif\", fontsize=11];\n  edge [fontname=\"sans-serif\", fontsize=9];\n",
    );
    let mut keys = BTreeSet::new();
    let mut pairs = BTreeSet::new();
    for site in rows(network) {
        let name = site["site"].as_str().unwrap_or_default();
        let reachable = site["reachable"].as_bool().unwrap_or(false);
        let (label, style) = if name == me {
            (format!("{name}\n(this site)"), "rounded,bold")
        } else if reachable {
            (name.to_owned(), "rounded")
        } else {
            (format!("{name}\n(unreachable)"), "rounded,dashed")
        };
        let _ = writeln!(
            out,
            "  {} [shape=box, style=\"{style}\", label={}];",
            quote(&format!("site:{name}")),
            quote(&label)
        );
        for key in rows(&site["routingKeys"]) {
            let key = key.as_str().unwrap_or_default().to_owned();
            let _ = writeln!(
                out,
                "  {} -> {} [style=dotted, label=\"connector\"];",
                quote(&format!("key:{key}")),
                quote(&format!("site:{name}"))
            );
            keys.insert(key);
        }
        for link in rows(&site["links"]) {
            let peer = link["peer"].as_str().unwrap_or_default();
            let (a, b) = if name < peer {
                (name, peer)
            } else {
                (peer, name)
            };
            if pairs.insert((a.to_owned(), b.to_owned())) {
                let cost = link["cost"].as_u64().unwrap_or(0);
                let own = [a, b]
                    .contains(&me)
                    .then(|| own_link(&rows(links), if a == me { b } else { a }));
                let (detail, attrs) = match own.flatten() {
                    Some((true, rtt)) => (format!("up{rtt}, "), ""),
                    Some((false, _)) => ("down, ".to_owned(), ", color=red, style=dashed"),
                    None => (String::new(), ""),
                };
                let _ = writeln!(
                    out,
                    "  {} -> {} [dir=none, label={}{attrs}];",
                    quote(&format!("site:{a}")),
                    quote(&format!("site:{b}")),
                    quote(&format!("{detail}cost {cost}"))
                );
            }
        }
    }
    for listener in rows(listeners) {
        let name = listener["name"].as_str().unwrap_or_default();
        let key = listener["routingKey"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let port = listener["port"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "  {} [shape=note, label={}];\n  {} -> {} [label=\"listener\"];\n  {} -> {} [style=invis];",
            quote(&format!("listener:{name}")),
            quote(&format!("listener {name}\n:{port}")),
            quote(&format!("listener:{name}")),
            quote(&format!("key:{key}")),
            quote(&format!("site:{me}")),
            quote(&format!("listener:{name}")),
        );
        keys.insert(key);
    }
    for key in keys {
        let _ = writeln!(
            out,
            "  {} [shape=ellipse, label={}];",
            quote(&format!("key:{key}")),
            quote(&key)
        );
    }
    out.push_str("}\n");
    out
}

/// Whether this site's own link to `peer` is up, and its round-trip time as a label suffix.
fn own_link(links: &[Value], peer: &str) -> Option<(bool, String)> {
    let mine: Vec<&Value> = links.iter().filter(|l| l["peer"] == peer).collect();
    if mine.is_empty() {
        return None;
    }
    let up = mine.iter().any(|l| l["status"] == "up");
    let rtt = mine
        .iter()
        .filter_map(|l| l["rttMicros"].as_u64())
        .filter(|&us| us > 0)
        .min()
        .map(|us| format!(", {:.2} ms", us as f64 / 1000.0))
        .unwrap_or_default();
    Some((up, rtt))
}

/// A DOT string literal: quotes and backslashes escaped, newlines as DOT's `\n`.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sites_links_keys_and_listeners_are_drawn_once_each() {
        let network = json!([
            {"site": "east", "reachable": true, "routingKeys": [], "links": [{"peer": "west", "cost": 1}]},
            {"site": "west", "reachable": true, "routingKeys": ["web"], "links": [{"peer": "east", "cost": 1}]},
            {"site": "gone", "reachable": false, "routingKeys": [], "links": []},
        ]);
        let links = json!([{"peer": "west", "status": "up", "rttMicros": 250}]);
        let listeners = json!([{"name": "web-in", "routingKey": "web", "port": 9080}]);
        let graph = dot("east", &network, &links, &listeners);
        assert!(graph.starts_with("digraph skiff {"), "{graph}");
        assert!(
            graph.contains(
                r#""site:east" [shape=box, style="rounded,bold", label="east\n(this site)"];"#
            ),
            "{graph}"
        );
        assert!(graph.contains(r#"label="gone\n(unreachable)""#), "{graph}");
        assert_eq!(
            graph.matches(r#""site:east" -> "site:west""#).count(),
            1,
            "{graph}"
        );
        assert!(graph.contains(r#"label="up, 0.25 ms, cost 1""#), "{graph}");
        assert!(
            graph.contains(r#""key:web" -> "site:west" [style=dotted, label="connector"];"#),
            "{graph}"
        );
        assert!(
            graph.contains(r#""listener:web-in" -> "key:web" [label="listener"];"#),
            "{graph}"
        );
        assert_eq!(
            graph.matches(r#""key:web" [shape=ellipse"#).count(),
            1,
            "{graph}"
        );
    }

    #[test]
    fn a_down_link_is_drawn_dashed_and_names_are_quoted() {
        let network = json!([
            {"site": "a", "reachable": true, "routingKeys": ["k\"ey"], "links": [{"peer": "b", "cost": 3}]},
        ]);
        let links = json!([{"peer": "b", "status": "down"}]);
        let graph = dot("a", &network, &links, &json!([]));
        assert!(
            graph.contains(r#"label="down, cost 3", color=red, style=dashed"#),
            "{graph}"
        );
        assert!(graph.contains(r#""key:k\"ey""#), "{graph}");
    }
}
