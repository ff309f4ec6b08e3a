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
