//! Every test the docs name exists: a claim that cites a test nobody can run is not a claim.
//!
//! A test is named in a doc as a code span: `file.rs::test_name`, or a bare snake_case name of
//! five words or more (the project's test names; kernel symbols and settings are shorter or
//! carry other characters, and metric names start with `skiff_`). Each must be a `fn` in the
//! tree, in the named file when one is given.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};

/// Where the docs are read from, and where test functions are looked for.
const DOCS: &[&str] = &["README.md", "docs", "bench/README.md"];
const CODE: &[&str] = &["router", "kernel-tests", "bench", "xtask"];

/// Checks that every test the docs name exists.
///
/// # Errors
/// Listing each named test that is not found.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let mut sources = Vec::new();
    for dir in CODE {
        collect(&root.join(dir), "rs", &mut sources)?;
    }
    let code: Vec<(PathBuf, String)> = sources
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "target"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        })
        .collect();
    let mut docs = Vec::new();
    for doc in DOCS {
        let path = root.join(doc);
        if path.is_dir() {
            collect(&path, "md", &mut docs)?;
        } else {
            docs.push(path);
        }
    }
    let mut missing = Vec::new();
    let mut named = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).with_context(|| format!("{}", doc.display()))?;
        for span in text.split('`').skip(1).step_by(2) {
            let Some((file, name)) = test_reference(span) else {
                continue;
            };
            named += 1;
            let defined = code.iter().any(|(path, source)| {
                file.is_none_or(|f| path.ends_with(f)) && defines(source, name)
            });
            if !defined {
                let shown = doc.strip_prefix(root).unwrap_or(doc).display();
                missing.push(format!("{shown}: `{span}`"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "docs name tests that do not exist:\n  {}",
        missing.join("\n  ")
    );
    println!("lint: the {named} tests the docs name exist");
    Ok(())
}

/// `file.rs::name` or a bare test-like name: the file (if any) and the name.
fn test_reference(span: &str) -> Option<(Option<&str>, &str)> {
    let (file, name) = match span.rsplit_once("::") {
        Some((file, name)) if file.ends_with(".rs") => (Some(file), name),
        Some(_) => return None,
        None => (None, span),
    };
    let snake = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // A metric (docs/metrics.md), not a test.
    if !snake || (file.is_none() && name.starts_with("skiff_")) {
        return None;
    }
    (file.is_some() || name.matches('_').count() >= 4).then_some((file, name))
}

/// Whether `source` defines a function `name`.
fn defines(source: &str, name: &str) -> bool {
    source.match_indices(name).any(|(at, _)| {
        let before = source[..at].trim_end();
        let after = source[at + name.len()..].chars().next();
        before.ends_with("fn") && matches!(after, Some('(' | '<'))
    })
}

fn collect(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_like_spans_are_recognised_and_others_are_not() {
        assert_eq!(
            test_reference("network.rs::bad_peers"),
            Some((Some("network.rs"), "bad_peers"))
        );
        assert_eq!(
            test_reference("a_stalled_backend_holds_back_an_accelerated_client"),
            Some((None, "a_stalled_backend_holds_back_an_accelerated_client"))
        );
        assert_eq!(test_reference("bpf_msg_redirect_hash"), None);
        assert_eq!(test_reference("Error::Identity"), None);
        assert_eq!(test_reference("skiff status"), None);
        assert_eq!(test_reference("skiff_link_streams_opened_total"), None);
    }

    #[test]
    fn only_a_function_definition_counts() {
        let source =
            "fn other() { a_call_to_the_test_name_here(); }\nfn real_one_with_five_words() {}";
        assert!(defines(source, "real_one_with_five_words"));
        assert!(!defines(source, "a_call_to_the_test_name_here"));
    }
}
