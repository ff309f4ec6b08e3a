//! The references that come from the code cannot drift: the committed
//! configuration schema and reference page are what the code generates,
//! and a validator nobody here wrote (`check-jsonschema`, from PyPI in the
//! suite's venv) agrees with the proxy's own `check` on good and bad files,
//! and accepts every shipped configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

const REGENERATE: &str = "regenerate with: cargo run -- config schema > docs/proxy.schema.json \
     && cargo run -- config reference > docs/configuration.md";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_committed_schema_and_reference_are_what_the_code_generates() {
    let schema = std::fs::read_to_string(repo("docs/proxy.schema.json")).unwrap_or_default();
    assert!(
        schema == coupa_auth_proxy::config::schema_text() + "\n",
        "docs/proxy.schema.json differs from the code's schema; {REGENERATE}"
    );
    let page = std::fs::read_to_string(repo("docs/configuration.md")).unwrap_or_default();
    assert!(
        page == coupa_auth_proxy::config::reference_markdown(),
        "docs/configuration.md differs from the code's reference; {REGENERATE}"
    );
    let example = std::fs::read_to_string(repo("proxy.toml.example")).unwrap();
    assert!(
        example.starts_with("#:schema ./docs/proxy.schema.json\n"),
        "editors find the schema through the example's first line"
    );
}

/// `check-jsonschema`, when the venv has it (a failure under CI).
fn validator() -> Option<PathBuf> {
    let tool = repo(".venv/bin/check-jsonschema");
    if tool.exists() {
        return Some(tool);
    }
    skip(
        "check-jsonschema",
        "python3 -m venv .venv && .venv/bin/pip install check-jsonschema",
    );
    None
}

/// Whether `check-jsonschema` accepts `file` (TOML) against the schema.
fn schema_accepts(tool: &Path, file: &Path) -> (bool, String) {
    let output = Command::new(tool)
        .args(["--default-filetype", "toml", "--schemafile"])
        .arg(repo("docs/proxy.schema.json"))
        .arg(file)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The TOML a Kubernetes manifest's ConfigMap carries as `proxy.toml`.
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest.lines().skip_while(|l| l.trim() != "proxy.toml: |");
    let Some(opening) = lines.next() else {
        return String::new();
    };
    let indent = opening.len() - opening.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect()
}

#[test]
fn every_shipped_configuration_passes_the_schema() {
    let Some(tool) = validator() else {
        return;
    };
    let dir = tempdir::Dir::new("schema-shipped");
    let mut files = vec![
        repo("proxy.toml.example"),
        repo("examples/two-integrations.toml"),
    ];
    for manifest in ["sidecar", "shared-service"] {
        let text =
            std::fs::read_to_string(repo(&format!("deploy/kubernetes/{manifest}.yaml"))).unwrap();
        let toml = configmap_toml(&text);
        assert!(toml.contains("[coupa]"), "{manifest}: {toml}");
        let file = dir.path().join(format!("{manifest}.toml"));
        std::fs::write(&file, toml).unwrap();
        files.push(file);
    }
    for file in files {
        let (accepted, said) = schema_accepts(&tool, &file);
        assert!(accepted, "{}: {said}", file.display());
    }
}

#[test]
fn the_schema_and_check_agree_on_good_and_bad_files() {
    let Some(tool) = validator() else {
        return;
    };
    let good = config_text("https://acme.coupahost.com", "", "");
    let cases = [
        ("good", good.clone(), true),
        (
            "misspelled",
            good.replace("[admin]\n", "[admin]\nadress = \"127.0.0.1:9\"\n"),
            false,
        ),
        (
            "wrong_type",
            good.replace("[coupa]\n", "[coupa]\nmax_connections = \"many\"\n"),
            false,
        ),
        (
            "unknown_value",
            good.replace("[oauth]\n", "[oauth]\nclient_auth = \"digest\"\n"),
            false,
        ),
        (
            "missing_required",
            good.replace("scopes = [\"core.common.read\", \"core.invoice.read\"]\n", ""),
            false,
        ),
        (
            "two_credentials",
            good.replace("[oauth]\n", "[oauth.default]\n")
                + "\n[oauth.reports]\nclient_id = \"r\"\nclient_secret = \"s\"\nscopes = [\"core.common.read\"]\n",
            true,
        ),
    ];
    let dir = tempdir::Dir::new("schema-agree");
    for (name, text, valid) in cases {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, &text).unwrap();
        let (schema_says, said) = schema_accepts(&tool, &file);
        assert_eq!(schema_says, valid, "check-jsonschema on {name}: {said}");
        let (code, stdout, stderr) = run_binary(
            &["check", "--config", file.to_str().unwrap()],
            &[("TEST_CLIENT_SECRET", "s3cret")],
        );
        assert_eq!(code == Some(0), valid, "check on {name}: {stdout}{stderr}");
    }
}

#[test]
fn a_configmap_toml_is_read_by_its_indentation() {
    let manifest = "data:\n  proxy.toml: |\n    [coupa]\n    base_url = \"x\"\n\n    [oauth]\nkind: Deployment\n";
    assert_eq!(
        configmap_toml(manifest),
        "[coupa]\nbase_url = \"x\"\n\n[oauth]\n"
    );
}

#[test]
fn the_cli_reference_and_man_page_are_what_the_binary_generates() {
    let (code, generated, stderr) = run_binary(&["cli-reference"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let committed = std::fs::read_to_string(repo("docs/cli.md")).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/cli.md differs from the command line's definition; regenerate with: \
         cargo run -- cli-reference > docs/cli.md"
    );
    let (code, man, stderr) = run_binary(&["manpage"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        man.starts_with(".ie") && man.contains(".TH coupa-auth-proxy 1"),
        "{man}"
    );
    // Every subcommand the reference lists is in the man page too.
    for line in committed
        .lines()
        .filter_map(|l| l.strip_prefix("## `coupa-auth-proxy "))
    {
        let sub = line.trim_end_matches('`').split(' ').next().unwrap_or("");
        assert!(
            man.contains(&sub.replace('-', "\\-")),
            "{sub} missing from the man page"
        );
    }
}

/// Metric names in Prometheus text: counters with their `_total`.
fn exposed_metrics(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            })
        })
        .collect()
}

/// Metric names a page's tables document (first column).
fn documented_metrics(page: &str) -> std::collections::BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("| `coupa_proxy_"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| format!("coupa_proxy_{name}"))
        .collect()
}

#[test]
fn every_metric_the_code_registers_is_documented_and_no_other() {
    use coupa_auth_proxy::insight::{Insight, Via};
    use coupa_auth_proxy::metrics::Metrics;
    let config = parse_config(
        &(config_text("https://acme.coupahost.com", "", "")
            + "\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"0c4eee8f69a22937ef79131d4d760ce11edf2c8ce883fb6bec853bc4ff49ca85\"\n"),
    );
    let insight = Insight::new(&config);
    // The migration view's counters appear once a request is counted.
    insight.record(
        &insight.usage("erp"),
        Via::LegacyKey,
        &http::Method::GET,
        "/api/invoices",
        http::StatusCode::OK,
        false,
    );
    let stores = std::sync::Arc::new(vec![(
        "default".to_owned(),
        std::sync::Arc::new(coupa_auth_proxy::token::TokenStore::new()),
    )]);
    // Clustered: [cluster]'s metrics are registered too.
    let metrics = Metrics::new(stores, true, &insight);
    let exposed = exposed_metrics(&metrics.render());
    let page = std::fs::read_to_string(repo("docs/observability.md")).unwrap();
    let documented = documented_metrics(&page);
    // A labelled family shows nothing until it has a sample: the names
    // registered in the source count as well.
    let registered = registered_in_source();
    let base = |name: &str| {
        let name = name.trim_start_matches("coupa_proxy_");
        name.strip_suffix("_total").unwrap_or(name).to_owned()
    };
    let undocumented: Vec<_> = exposed
        .iter()
        .filter(|name| !documented.contains(*name))
        .chain(
            registered
                .iter()
                .filter(|name| !documented.iter().any(|d| base(d) == **name)),
        )
        .collect();
    let stale: Vec<_> = documented
        .iter()
        .filter(|d| !exposed.contains(*d) && !registered.contains(&base(d)))
        .collect();
    assert!(
        registered.contains("refused_requests"),
        "the source scan works"
    );
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "registered but not in docs/observability.md: {undocumented:?}; \
         documented but not registered: {stale:?}"
    );
}

/// The names `registry.register("…", …)` registers across `src/`
/// (without the `coupa_proxy_` prefix and a counter's `_total`).
fn registered_in_source() -> std::collections::BTreeSet<String> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for after in text.split(".register(").skip(1) {
                let name = after
                    .trim_start()
                    .strip_prefix('"')
                    .and_then(|r| r.split('"').next());
                if let Some(name) = name.filter(|n| !n.is_empty()) {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    walk(&repo("src"), &mut names);
    names
}

#[test]
fn the_metric_checkers_read_what_they_should() {
    let text =
        "# HELP coupa_proxy_a x\n# TYPE coupa_proxy_a counter\n# TYPE coupa_proxy_b histogram\n";
    assert_eq!(
        exposed_metrics(text).into_iter().collect::<Vec<_>>(),
        ["coupa_proxy_a_total", "coupa_proxy_b"]
    );
    let page = "| `coupa_proxy_a_total` | counter |\n| `other` |\n| `coupa_proxy_b` | x |\n";
    assert_eq!(
        documented_metrics(page).into_iter().collect::<Vec<_>>(),
        ["coupa_proxy_a_total", "coupa_proxy_b"]
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped,
/// spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The relative links of `page` (at `path`) that point nowhere: a missing
/// file, or an `#anchor` no heading of the target has.
fn broken_links(path: &Path, page: &str) -> Vec<String> {
    let mut broken = Vec::new();
    let mut in_code = false;
    for line in page.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let link = &rest[..end];
            rest = &rest[end..];
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
            let target = if file.is_empty() {
                path.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).join(file)
            };
            let Ok(text) = std::fs::read_to_string(&target) else {
                broken.push(format!("{link} (no file {})", target.display()));
                continue;
            };
            if !anchor.is_empty()
                && !text
                    .lines()
                    .filter_map(|l| {
                        l.trim_start_matches('#')
                            .strip_prefix(' ')
                            .filter(|_| l.starts_with('#'))
                    })
                    .any(|heading| slug(heading) == anchor)
            {
                broken.push(format!("{link} (no heading #{anchor})"));
            }
        }
    }
    broken
}

fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo("README.md")];
    for entry in std::fs::read_dir(repo("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in broken_links(&page, &text) {
            broken.push(format!("{}: {link}", page.display()));
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_checker_finds_a_missing_file_and_a_missing_anchor() {
    let dir = tempdir::Dir::new("links");
    let page = dir.path().join("page.md");
    std::fs::write(
        dir.path().join("other.md"),
        "# Other\n\n## Sharing Coupa's budget\n",
    )
    .unwrap();
    let text = "[a](other.md#sharing-coupas-budget) [b](other.md#nope) [c](gone.md) \
                [d](#here) [e](https://example.com)\n\n## Here\n";
    std::fs::write(&page, text).unwrap();
    let broken = broken_links(&page, text);
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].starts_with("other.md#nope"), "{broken:?}");
    assert!(broken[1].starts_with("gone.md"), "{broken:?}");
}

/// The source files the development map names (by file name).
fn unmapped_sources(map: &str) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo("src"), &mut files);
    files
        .into_iter()
        .filter(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            !map.contains(&name)
        })
        .map(|f| f.display().to_string())
        .collect()
}

#[test]
fn every_source_file_is_in_the_development_map() {
    let page = std::fs::read_to_string(repo("docs/development.md")).unwrap();
    let map = page.split("```").nth(1).unwrap_or_default();
    let missing = unmapped_sources(map);
    assert!(
        missing.is_empty(),
        "source files missing from docs/development.md's map: {missing:?}"
    );
    // The check itself sees a file the map does not name.
    assert!(!unmapped_sources("main.rs lib.rs").is_empty());
}

#[test]
fn every_whole_config_example_in_the_docs_passes_check() {
    let dir = tempdir::Dir::new("doc-examples");
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (n, block) in text.split("```toml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap_or_default();
            // Fragments (one table to add) are not whole files.
            if !(block.contains("[coupa]") && block.contains("[oauth")) {
                continue;
            }
            let file = dir.path().join(format!("example-{n}.toml"));
            std::fs::write(&file, block).unwrap();
            let (code, stdout, stderr) = run_binary(
                &["check", "--config", file.to_str().unwrap()],
                &[("COUPA_CLIENT_SECRET", "s3cret")],
            );
            assert_eq!(
                code,
                Some(0),
                "{} example {n}: {stdout}{stderr}",
                page.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "the README's and the reference's examples");
}
