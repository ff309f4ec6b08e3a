//! The crate's module graph has no cycles: at every depth of the module
//! tree (top-level modules, their children, …) no module imports one that
//! imports it back, directly or through others. A cycle means one concept
//! split in two, or two concepts sharing a helper that belongs in a leaf.
//!
//! The graph is read from the source: every `crate::` and `super::` path
//! outside comments and `#[cfg(test)]` code, resolved to the longest module
//! it names. `cargo test --test it layout -- --nocapture` prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`token::consent::grant`) → source without tests and comments.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
            let relative = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match parts.last().map(String::as_str) {
                // The binary speaks to the library by its crate name.
                Some("main") if parts.len() == 1 => continue,
                Some("mod") | Some("lib") => {
                    parts.pop();
                }
                _ => {}
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            out.insert(parts.join("::"), code);
        }
    }
    let mut out = BTreeMap::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

/// The paths a `crate::` or `super::` prefix at `start` names: one, or
/// each entry of a `{…}` group.
fn paths_after(code: &str, start: usize) -> Vec<String> {
    let rest = &code[start..];
    let segment_end = |s: &str| {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(s.len())
    };
    let head = &rest[..segment_end(rest)];
    let after = &rest[head.len()..];
    // `super::{a, b}` as well as `crate::x::{a, b}`: each entry is a path.
    if (head.is_empty() || head.ends_with("::")) && after.starts_with('{') {
        let group = &after[1..after.find('}').unwrap_or(after.len())];
        return group
            .split(',')
            .map(|entry| {
                let entry = entry.trim();
                format!("{head}{}", &entry[..segment_end(entry)])
            })
            .collect();
    }
    vec![head.to_owned()]
}

/// Edges between modules neither of which contains the other.
fn edges(modules: &BTreeMap<String, String>) -> BTreeSet<(String, String)> {
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|candidate| modules.contains_key(candidate))
    };
    let contains = |outer: &str, inner: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}::"))
    };
    let mut edges = BTreeSet::new();
    for (module, code) in modules {
        let mut from = 0;
        while let Some(found) = code[from..].find(['c', 's']) {
            let at = from + found;
            from = at + 1;
            let boundary = at == 0 || !code.as_bytes()[at - 1].is_ascii_alphanumeric();
            let (base, prefix) = if code[at..].starts_with("crate::") {
                (String::new(), "crate::".len())
            } else if code[at..].starts_with("super::") {
                // `super::super::x` climbs once per `super`.
                let mut climbed: Vec<&str> = module.split("::").collect();
                let mut len = 0;
                while code[at + len..].starts_with("super::") {
                    climbed.pop();
                    len += "super::".len();
                }
                (climbed.join("::"), len)
            } else {
                continue;
            };
            if !boundary {
                continue;
            }
            for path in paths_after(code, at + prefix) {
                let full = if base.is_empty() {
                    path
                } else {
                    format!("{base}::{path}")
                };
                if let Some(target) = resolve(&full) {
                    if !contains(&target, module) && !contains(module, &target) {
                        edges.insert((module.clone(), target));
                    }
                }
            }
        }
    }
    edges
}

/// A cycle in `graph`, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let modules = modules();
    assert!(
        modules.contains_key("token::consent::grant"),
        "the walk found the tree"
    );
    let edges = edges(&modules);
    // The check sees real imports (a graph with none would pass anything).
    assert!(edges.contains(&("proxy::core".to_owned(), "token".to_owned())));
    let depth = modules.keys().map(|m| m.split("::").count()).max().unwrap();
    for level in 1..=depth {
        let cut = |m: &str| m.split("::").take(level).collect::<Vec<_>>().join("::");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in &edges {
            let (from, to) = (cut(from), cut(to));
            if from != to {
                graph.entry(from).or_default().insert(to);
            }
        }
        if level == 1 {
            println!("top-level imports:");
            for (from, to) in &graph {
                println!(
                    "  {from} -> {}",
                    to.iter().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        if let Some(cycle) = find_cycle(&graph) {
            let witnesses: Vec<String> = edges
                .iter()
                .filter(|(f, t)| cycle.windows(2).any(|w| cut(f) == w[0] && cut(t) == w[1]))
                .map(|(f, t)| format!("{f} -> {t}"))
                .collect();
            panic!(
                "import cycle at depth {level}: {}\nthrough: {}",
                cycle.join(" -> "),
                witnesses.join("; ")
            );
        }
    }
}

#[test]
fn grouped_imports_are_read_entry_by_entry() {
    // `super::{…}` named nothing before: a circle through it went unseen.
    let code = "use super::{tunnel, negotiated::Rewind};";
    assert_eq!(paths_after(code, 11), ["tunnel", "negotiated::Rewind"]);
    let code = "use crate::proxy::{auth, Trace};";
    assert_eq!(paths_after(code, 11), ["proxy::auth", "proxy::Trace"]);
    assert_eq!(paths_after("crate::token::store;", 7), ["token::store"]);
}
