//! The shipped deployment examples stay true: the configurations embedded
//! in the Kubernetes manifests validate against the real config loader.

use std::path::Path;

use coupa_auth_proxy::config::Config;

/// The `proxy.toml: |` blocks of a manifest, de-indented.
fn embedded_configs(manifest: &str) -> Vec<String> {
    let mut configs = Vec::new();
    let mut current: Option<String> = None;
    for line in manifest.lines() {
        if line.trim() == "proxy.toml: |" {
            current = Some(String::new());
            continue;
        }
        if let Some(text) = current.as_mut() {
            if line.is_empty() || line.starts_with("    ") {
                text.push_str(line.get(4..).unwrap_or(""));
                text.push('\n');
                continue;
            }
            configs.push(current.take().unwrap());
        }
    }
    configs.extend(current);
    configs
}

#[test]
fn configs_in_the_kubernetes_manifests_are_valid() {
    for name in ["sidecar.yaml", "shared-service.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes")
            .join(name);
        let manifest = std::fs::read_to_string(&path).unwrap();
        let configs = embedded_configs(&manifest);
        assert_eq!(configs.len(), 1, "{name}");
        // The secret files only exist in the cluster.
        let key = std::env::temp_dir().join(format!("deploy-test-key-{}", std::process::id()));
        std::fs::write(&key, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
        let text: String = configs[0]
            .lines()
            .map(|l| {
                if l.starts_with("client_secret_file") {
                    "client_secret = \"x\"".to_owned()
                } else if l.starts_with("encryption_key_file") {
                    format!("encryption_key_file = \"{}\"", key.display())
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        Config::from_toml(&text, Path::new("."), |_| None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
