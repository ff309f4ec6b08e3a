//! What a valid configuration still does riskily (plain HTTP off
//! loopback, an open status page, an ambiguous Basic secret, Redis in the
//! clear), each as a sentence naming the fix.

use super::{ClientAuth, Config};

impl Config {
    /// [`Config::warnings`] and what the process environment adds: proxy
    /// variables that are set but ignored.
    pub fn warnings_with_env(&self) -> Vec<String> {
        let mut warnings = self.warnings();
        warnings.extend(super::env::ignored_environment(
            self.coupa.egress_proxy.as_ref(),
            |name| std::env::var(name).ok(),
        ));
        warnings
    }

    /// What is allowed but risky in this configuration, one sentence each
    /// naming the fix: logged at start, printed by `check`, listed in
    /// `/readyz`.
    pub fn warnings(&self) -> Vec<String> {
        let listen = &self.listen;
        let mut warnings = Vec::new();
        if !self.admin.address.ip().is_loopback() && self.admin.status_password_sha256.is_none() {
            warnings.push(format!(
                "admin.address {} is not loopback and admin.status_password_sha256 is not set: the status page and \
                 /status.json answer 401 (probes and /metrics stay open); set it to what `coupa-auth-proxy hash-key` \
                 prints for a password",
                self.admin.address
            ));
        }
        if let Some(cluster) = &self.cluster {
            let is_loopback = |host: &str| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            };
            // redis:// is not a special scheme to `url`: its host comes back
            // as an opaque name, so an IP address is parsed here.
            let (plain, to_loopback) = match &cluster.sentinel {
                Some(sentinel) => (
                    !sentinel.tls,
                    sentinel.nodes.iter().all(|(host, _)| is_loopback(host)),
                ),
                None => (
                    cluster.redis_url.starts_with("redis://"),
                    url::Url::parse(&cluster.redis_url)
                        .ok()
                        .and_then(|u| u.host_str().map(is_loopback))
                        .unwrap_or(false),
                ),
            };
            if plain && !to_loopback {
                warnings.push(
                    "cluster.redis_url uses redis:// (or redis+sentinel://) to another machine: its password and the sealed \
                     tokens cross the network unencrypted; use rediss:// (rediss+sentinel://, TLS)"
                        .to_owned(),
                );
            }
        }
        for credential in &self.credentials {
            let oauth = &credential.oauth;
            let ambiguous = oauth.client_auth == ClientAuth::Basic
                && oauth.client_secret.as_ref().is_some_and(|secret| {
                    crate::basic_auth::is_ambiguous(&oauth.client_id, secret.expose())
                });
            if ambiguous {
                warnings.push(format!(
                    "credential {}: oauth.client_auth = \"basic\" with a client id or secret holding \
                     characters outside A-Z a-z 0-9 - . _ *: RFC 6749 §2.3.1 form-urlencodes them inside \
                     Basic and this proxy does, but servers that do not decode (Doorkeeper, for one) then \
                     answer invalid_client; client_auth = \"body\" (the default) is unambiguous",
                    credential.name
                ));
            }
        }
        if listen.address.ip().is_loopback() {
            return warnings;
        }
        if self.integrations.is_empty() {
            warnings.push(format!(
                "listen.allow_unauthenticated is set: anyone who can reach {} gets requests sent with a Coupa token",
                listen.address
            ));
        }
        if listen.tls.is_none() {
            let carried = if self.integrations.is_empty() {
                "Coupa's answers cross"
            } else {
                "legacy API keys and Coupa's answers cross"
            };
            warnings.push(format!(
                "listen.address {} is reachable from other machines over plain HTTP: {carried} the network unencrypted; \
                 add [listen.tls] (cert_file, key_file), or keep the proxy behind a mesh that encrypts with mTLS",
                listen.address
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn a_basic_secret_that_the_rfc_encoding_changes_is_warned_about() {
        let basic = |secret: &str| {
            MINIMAL
                .replace("${COUPA_CLIENT_SECRET}", secret)
                .replace("[oauth]\n", "[oauth]\nclient_auth = \"basic\"\n")
        };
        assert!(load(&basic("Zx9_Qm-4.kT7")).unwrap().warnings().is_empty());
        let warnings = load(&basic("a+b/c=d%e:f&g")).unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("RFC 6749"), "{warnings:?}");
        assert!(
            warnings[0].contains("client_auth = \"body\""),
            "{warnings:?}"
        );
        assert!(
            !warnings[0].contains("a+b/c"),
            "the secret stays out: {warnings:?}"
        );
        let body = MINIMAL.replace("${COUPA_CLIENT_SECRET}", "a+b/c=d%e:f&g");
        assert!(load(&body).unwrap().warnings().is_empty());
    }

    #[test]
    fn cleartext_on_the_network_is_warned_about_and_names_the_fix() {
        assert!(load(MINIMAL).unwrap().warnings().is_empty());
        let key = "1".repeat(64);
        let shared = MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:8080")
            + &format!("\n[[integration]]\nname = \"erp\"\napi_key_sha256 = \"{key}\"\n");
        let warnings = load(&shared).unwrap().warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("legacy API keys"), "{warnings:?}");
        assert!(warnings[0].contains("[listen.tls]"), "{warnings:?}");
        assert!(warnings[0].contains("mTLS"), "{warnings:?}");
    }
}
