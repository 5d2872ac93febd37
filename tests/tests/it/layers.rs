//! Imports run one way inside a service: no circle between its files. For every file of a
//! service, the modules it names through `crate::…` and `super::…` (in `use` lists and in
//! paths) are read from the source, each resolved to the deepest module file it reaches; a
//! module naming its own submodules and anything naming `lib.rs` are not edges (a folder's
//! `mod.rs` declares and re-exports its files; `lib.rs` composes). A circle fails with its
//! files in order. Comments and test modules are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every service (by folder).
const SERVICES: [&str; 6] = [
    "catalog",
    "eligibility",
    "wallet",
    "scheduler",
    "notification",
    "gateway",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// `module path → source` of the files under `src` (`a/mod.rs` and `a.rs` are `a`).
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("readable folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, src, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("readable source");
            out.insert(parts.join("::"), code_of(&text));
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The code of a file: without its test module and comment lines.
fn code_of(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths named after each `prefix` in `code`: `prefix a::b::c` gives `a::b::c`, and
/// `prefix {a::b, c::{d, e}}` gives `a::b` and `c` (a group's first segment is enough to
/// find the module when it is a folder's file: its items follow).
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for item in split_top(&group[..end]) {
                out.push(path_prefix(item.trim()));
            }
        } else {
            out.push(path_prefix(rest));
        }
    }
    out
}

fn matching_brace(s: &str) -> usize {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// A `use` group's items, split at its top-level commas.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The leading `a::b::c` of `s` (lower-case segments only: modules, not items).
fn path_prefix(s: &str) -> String {
    let mut segments = Vec::new();
    let mut rest = s;
    loop {
        let len = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        if len == 0 {
            break;
        }
        segments.push(&rest[..len]);
        match rest[len..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    segments.join("::")
}

/// The deepest module of `known` that `path` names, if any.
fn resolve(known: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|candidate| known.contains_key(candidate))
}

/// Each module's edges to the other modules it imports.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut graph = BTreeMap::new();
    for (module, code) in &known {
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        let mut named: Vec<String> = paths_after(code, "crate::");
        for path in paths_after(code, "super::") {
            named.push(if parent.is_empty() {
                path
            } else {
                format!("{parent}::{path}")
            });
        }
        let edges: BTreeSet<String> = named
            .iter()
            .filter_map(|p| resolve(&known, p))
            .filter(|to| to != module && to != "lib" && !to.starts_with(&format!("{module}::")))
            .collect();
        graph.insert(module.clone(), edges);
    }
    graph
}

/// A circle of `graph`, in order, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_service_file_imports_in_a_circle() {
    for service in SERVICES {
        let graph = graph(&root().join("services").join(service).join("src"));
        assert!(graph.len() > 5, "{service}: {} files", graph.len());
        if let Some(found) = circle(&graph) {
            panic!("{service}: an import circle: {}", found.join(" → "));
        }
    }
}

#[test]
fn the_scan_sees_a_circle() {
    let dir = std::env::temp_dir().join(format!("tessera-layers-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("checkout")).expect("folder");
    let files = [
        ("lib.rs", "mod a;\nmod checkout;\n"),
        ("a.rs", "use crate::checkout::plan::Pick;\n"),
        ("checkout/mod.rs", "pub mod plan;\npub mod commit;\n"),
        ("checkout/plan.rs", "use super::commit::{Counted, store};\n"),
        (
            "checkout/commit.rs",
            "// use crate::a; (a comment is not an import)\nuse crate::{a::Thing, checkout::plan};\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("file");
    }
    let graph = graph(&dir);
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert_eq!(
        graph["checkout::commit"],
        BTreeSet::from(["a".to_string(), "checkout::plan".to_string()])
    );
    let found = circle(&graph).expect("a circle");
    assert!(
        found.contains(&"checkout::plan".to_string()) && found.contains(&"a".to_string()),
        "{found:?}"
    );
}
