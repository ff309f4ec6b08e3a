//! `POST /oauth2/token` on the proxy's listener, answered by the proxy: a
//! tool authenticates as a local client (HTTP Basic or form fields, as
//! Coupa accepts) with `grant_type=client_credentials` and gets a local
//! token. Errors are RFC 6749 §5.2's. Nothing here is ever forwarded.

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method, StatusCode};

/// The largest token request read; real ones are a few hundred bytes.
pub const MAX_BODY: usize = 16 * 1024;

/// A well-formed token request, not yet authenticated.
pub struct TokenRequest {
    pub client_id: String,
    pub client_secret: String,
    pub grant_type: String,
    /// Requested scopes; empty: the credential's.
    pub scopes: Vec<String>,
}

/// An RFC 6749 error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("invalid_request: {0}")]
    InvalidRequest(String),
    #[error("invalid_client: unknown client or wrong secret")]
    InvalidClient,
    #[error("unsupported_grant_type: {0}")]
    UnsupportedGrantType(String),
    #[error("invalid_scope: {0}")]
    InvalidScope(String),
}

impl OAuthError {
    pub fn code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) => "invalid_request",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::UnsupportedGrantType(_) => "unsupported_grant_type",
            OAuthError::InvalidScope(_) => "invalid_scope",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            OAuthError::InvalidClient => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn description(&self) -> String {
        match self {
            OAuthError::InvalidRequest(why)
            | OAuthError::UnsupportedGrantType(why)
            | OAuthError::InvalidScope(why) => why.clone(),
            OAuthError::InvalidClient => {
                "unknown client or wrong secret (the proxy's local client of this integration, not Coupa's)".to_owned()
            }
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.code(), "error_description": self.description()})
    }
}

fn invalid(why: impl Into<String>) -> OAuthError {
    OAuthError::InvalidRequest(why.into())
}

/// Reads a token request from its method, headers and form body.
pub fn parse(
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<TokenRequest, OAuthError> {
    if method != Method::POST {
        return Err(invalid("the token endpoint takes POST"));
    }
    let form_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    if !form_type {
        return Err(invalid(
            "the body must be application/x-www-form-urlencoded (RFC 6749 §4.4.2)",
        ));
    }
    let mut fields: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(body) {
        if fields.iter().any(|(n, _)| *n == name) {
            return Err(invalid(format!("parameter {name} is sent more than once")));
        }
        fields.push((name.into_owned(), value.into_owned()));
    }
    let take = |name: &str| -> Option<String> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let grant_type = take("grant_type").ok_or_else(|| invalid("grant_type is missing"))?;
    let in_form = (take("client_id"), take("client_secret"));
    let basic = headers
        .get(AUTHORIZATION)
        .map(|value| basic_credentials(value.as_bytes()))
        .transpose()?;
    let (client_id, client_secret) = match (basic, in_form) {
        (Some(_), (Some(_), _) | (_, Some(_))) => return Err(invalid(
            "client credentials are sent both in the Authorization header and in the body; use one",
        )),
        (Some(pair), _) => pair,
        (None, (Some(id), Some(secret))) => (id, secret),
        (None, _) => return Err(OAuthError::InvalidClient),
    };
    let scopes = take("scope")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(TokenRequest {
        client_id,
        client_secret,
        grant_type,
        scopes,
    })
}

/// The local client's id and secret from HTTP Basic (RFC 6749 §2.3.1).
fn basic_credentials(value: &[u8]) -> Result<(String, String), OAuthError> {
    crate::basic_auth::decode(value).map_err(|e| match e {
        crate::basic_auth::BasicError::NotBasic => invalid(
            "the Authorization header must be HTTP Basic with the local client's id and secret",
        ),
        crate::basic_auth::BasicError::Malformed => OAuthError::InvalidClient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use http::HeaderValue;

    fn form_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers
    }

    #[test]
    fn credentials_come_from_the_form_or_basic_but_not_both() {
        let body = b"grant_type=client_credentials&client_id=snap&client_secret=s%26cret&scope=a+b";
        let request = parse(&Method::POST, &form_headers(), body).unwrap();
        assert_eq!(
            (request.client_id.as_str(), request.client_secret.as_str()),
            ("snap", "s&cret")
        );
        assert_eq!(request.scopes, ["a", "b"]);

        let mut headers = form_headers();
        // id "snap", secret "s:cret&" form-encoded inside Basic.
        let basic = STANDARD.encode("snap:s%3Acret%26");
        headers.insert(AUTHORIZATION, format!("Basic {basic}").parse().unwrap());
        let request = parse(&Method::POST, &headers, b"grant_type=client_credentials").unwrap();
        assert_eq!(request.client_secret, "s:cret&");
        assert!(request.scopes.is_empty());

        let both = parse(
            &Method::POST,
            &headers,
            b"grant_type=client_credentials&client_id=snap",
        );
        assert!(matches!(both, Err(OAuthError::InvalidRequest(_))));
    }

    #[test]
    fn malformed_requests_get_their_rfc_6749_error() {
        let cases: [(&Method, HeaderMap, &[u8], &str); 6] = [
            (
                &Method::GET,
                form_headers(),
                b"grant_type=client_credentials",
                "invalid_request",
            ),
            (
                &Method::POST,
                HeaderMap::new(),
                b"grant_type=client_credentials",
                "invalid_request",
            ),
            (
                &Method::POST,
                form_headers(),
                b"client_id=a&client_secret=b",
                "invalid_request",
            ),
            (
                &Method::POST,
                form_headers(),
                b"grant_type=client_credentials&grant_type=password&client_id=a&client_secret=b",
                "invalid_request",
            ),
            (
                &Method::POST,
                form_headers(),
                b"grant_type=client_credentials",
                "invalid_client",
            ),
            (
                &Method::POST,
                form_headers(),
                b"grant_type=client_credentials&client_id=a",
                "invalid_client",
            ),
        ];
        for (method, headers, body, code) in cases {
            let error = parse(method, &headers, body).err().unwrap();
            assert_eq!(error.code(), code, "{}", String::from_utf8_lossy(body));
        }
        let mut headers = form_headers();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(
            parse(&Method::POST, &headers, b"grant_type=client_credentials")
                .err()
                .unwrap(),
            OAuthError::InvalidClient
        );
        assert_eq!(OAuthError::InvalidClient.status(), 401);
    }
}
