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

#[cfg(test)]
mod tests {
    use super::*;

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
