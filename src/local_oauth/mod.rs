//! Tools that fetch their own token (SnapLogic's OAuth2 account, Postman,
//! OAuth client libraries) talk to the proxy as if it were Coupa's token
//! endpoint. The proxy answers with a local token of its own
//! ([`tokens`]) after checking the tool's local client ([`endpoint`]), and
//! swaps that token for Coupa's real one on every request. Coupa's secret
//! and tokens never leave the proxy.

pub mod endpoint;
pub mod tokens;

pub use endpoint::OAuthError;
pub use tokens::{Grant, LocalTokens};

/// The path answered by the proxy itself.
pub const TOKEN_PATH: &str = "/oauth2/token";

/// Whether `path` names an OAuth endpoint (in any spelling a server in
/// front of Coupa might normalise to one), which is never forwarded: a
/// client must not reach Coupa's token endpoint with the proxy's bearer.
pub fn is_oauth_path(path: &str) -> bool {
    if path.starts_with("/api/") {
        return false;
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode(path.as_bytes()).collect();
    decoded
        .windows(6)
        .any(|w| w.eq_ignore_ascii_case(b"oauth2"))
}

/// The bearer token of an `Authorization` value, if it is one.
pub fn bearer_of(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, token) = text.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_an_oauth_path_is_caught_and_api_paths_are_not() {
        for path in [
            "/oauth2/token",
            "/oauth2/token/",
            "//oauth2/token",
            "/OAuth2/Token",
            "/%6Fauth2/token",
            "/./oauth2/authorizations",
            "/oauth2/scopes",
        ] {
            assert!(is_oauth_path(path), "{path}");
        }
        for path in ["/api/invoices", "/api/oauth2_clients", "/", "/healthz"] {
            assert!(!is_oauth_path(path), "{path}");
        }
    }

    #[test]
    fn bearer_values_are_read_case_insensitively() {
        assert_eq!(bearer_of(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_of(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer_of(b"Basic abc"), None);
        assert_eq!(bearer_of(b"Bearer "), None);
    }
}
