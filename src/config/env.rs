//! `${NAME}` expansion of every string in the file, before its shape is
//! checked, so a secret can come from the environment.

use super::ConfigError;

/// Expands `${NAME}` in every string below `value`; `key` is the dotted path
/// used in error messages. Every failed expansion is added to `problems`
/// and leaves its string empty, so the later passes still run.
pub(super) fn expand_value(
    value: &mut toml::Value,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<ConfigError>,
) {
    match value {
        toml::Value::String(s) if s.contains('$') => match expand_str(s, key, env) {
            Ok(expanded) => *s = expanded,
            Err(problem) => {
                problems.push(problem);
                s.clear();
            }
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{key}[{i}]"), env, problems);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                expand_value(v, &format!("{key}.{k}"), env, problems);
            }
        }
        _ => {}
    }
}

/// `${NAME}` becomes the variable's value; `$${` is a literal `${`; any
/// other `$` stays as it is (secrets often contain one).
pub fn expand_str(
    input: &str,
    key: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or_else(|| ConfigError::BadExpansion {
                key: key.to_owned(),
            })?;
            let var = &tail[..end];
            let value = env(var).ok_or_else(|| ConfigError::MissingEnv {
                key: key.to_owned(),
                var: var.to_owned(),
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The environment variables that would otherwise steer HTTP clients;
/// every hop to Coupa ignores them (see `crate::egress`).
pub const PROXY_VARIABLES: [&str; 8] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

/// The proxy variables set in the environment, when they would have been
/// used but are not (no `[coupa.egress_proxy]`): a warning that names the
/// key to set.
pub fn ignored_environment(
    egress: Option<&super::EgressProxy>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    if egress.is_some() {
        return None;
    }
    let set: Vec<&str> = PROXY_VARIABLES
        .iter()
        .copied()
        .filter(|name| env(name).is_some_and(|v| !v.trim().is_empty()))
        .filter(|name| !name.eq_ignore_ascii_case("no_proxy"))
        .collect();
    (!set.is_empty()).then(|| {
        format!(
            "{} set in the environment but ignored: every connection to Coupa goes direct; \
             to go through that proxy, set [coupa.egress_proxy] url (and username, password_file)",
            set.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_named_only_when_it_would_have_mattered() {
        let env = |name: &str| (name == "HTTPS_PROXY").then(|| "http://corp:3128".to_owned());
        let warning = ignored_environment(None, env).unwrap();
        assert!(warning.contains("HTTPS_PROXY"), "{warning}");
        assert!(warning.contains("[coupa.egress_proxy]"), "{warning}");
        assert!(ignored_environment(None, |_| None).is_none());
        let egress = super::super::EgressProxy {
            url: "http://corp:3128".into(),
            host: "corp".into(),
            port: 3128,
            username: None,
            password: None,
            password_file: None,
        };
        assert!(ignored_environment(Some(&egress), env).is_none());
    }

    #[test]
    fn expansion_rules() {
        let e = |v: &str| (v == "A").then(|| "x".to_owned());
        assert_eq!(expand_str("a${A}b", "k", &e).unwrap(), "axb");
        assert_eq!(expand_str("p$ss$${A}", "k", &e).unwrap(), "p$ss${A}");
        assert!(matches!(
            expand_str("${A", "k", &e),
            Err(ConfigError::BadExpansion { .. })
        ));
    }

    #[test]
    fn every_unset_variable_is_reported_with_its_key() {
        let mut value: toml::Value =
            toml::from_str("a = \"${ONE}\"\nlist = [\"ok\", \"${TWO}\"]\n[t]\nb = \"${A}\"\n")
                .unwrap();
        let mut problems = Vec::new();
        expand_value(
            &mut value,
            "root",
            &|v: &str| (v == "A").then(|| "x".to_owned()),
            &mut problems,
        );
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown[0].starts_with("root.a: environment variable `ONE`"),
            "{shown:?}"
        );
        assert!(
            shown[1].starts_with("root.list[1]: environment variable `TWO`"),
            "{shown:?}"
        );
        assert_eq!(value["t"]["b"].as_str(), Some("x"));
    }
}
