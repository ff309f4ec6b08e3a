//! HTTP Basic client authentication as RFC 6749 §2.3.1 defines it: the
//! client id and secret are form-urlencoded, then joined by `:` and base64
//! encoded. One place for both sides, so the proxy's token client, its
//! local token endpoint and the fake Coupa agree on the rule; and plain
//! RFC 7617 Basic as browsers send it, for the status page's password.
//!
//! Not every server follows the rule (Doorkeeper 5.5 does not decode): for
//! a secret the encoding changes, Basic is ambiguous and the form body
//! (`client_auth = "body"`) is the safe choice; [`is_ambiguous`] tells.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Why an `Authorization` value is not usable Basic credentials.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BasicError {
    #[error("the Authorization header is not HTTP Basic")]
    NotBasic,
    #[error("the Basic credentials are not base64 of `id:secret`")]
    Malformed,
}

/// The `Authorization` value for `client_id` and `secret`, marked
/// sensitive.
pub fn encode(client_id: &str, secret: &str) -> http::HeaderValue {
    let joined = format!("{}:{}", urlencode(client_id), urlencode(secret));
    let mut value = http::HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(joined)))
        // Provably unreachable: "Basic " and base64 are visible ASCII.
        .unwrap_or_else(|_| http::HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

/// The client id and secret in an `Authorization` value, decoded.
pub fn decode(value: &[u8]) -> Result<(String, String), BasicError> {
    let (id, secret) = decode_plain(value)?;
    Ok((urldecode(&id), urldecode(&secret)))
}

/// The user and password of an `Authorization` value as RFC 7617 has
/// browsers and curl send them: `user:password` in base64, nothing more
/// encoded (unlike an OAuth client's, see [`decode`]).
pub fn decode_plain(value: &[u8]) -> Result<(String, String), BasicError> {
    let text = std::str::from_utf8(value).map_err(|_| BasicError::Malformed)?;
    let (scheme, encoded) = text.trim().split_once(' ').ok_or(BasicError::NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(BasicError::NotBasic);
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .map_err(|_| BasicError::Malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| BasicError::Malformed)?;
    let (user, password) = decoded.split_once(':').ok_or(BasicError::Malformed)?;
    Ok((user.to_owned(), password.to_owned()))
}

/// Whether the RFC's encoding changes the id or the secret: then servers
/// that decode and servers that do not disagree about them.
pub fn is_ambiguous(client_id: &str, secret: &str) -> bool {
    urlencode(client_id) != client_id || urlencode(secret) != secret
}

fn urlencode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn urldecode(value: &str) -> String {
    form_urlencoded::parse(format!("x={value}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_and_secret_are_form_urlencoded_before_base64() {
        let header = encode("my client", "a+b/c=d%e:f&g");
        assert!(header.is_sensitive());
        let header = header.to_str().unwrap();
        let inner = STANDARD
            .decode(header.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(inner).unwrap(),
            "my+client:a%2Bb%2Fc%3Dd%25e%3Af%26g"
        );
        assert_eq!(
            decode(header.as_bytes()).unwrap(),
            ("my client".to_owned(), "a+b/c=d%e:f&g".to_owned())
        );
    }

    #[test]
    fn unreserved_secrets_are_the_same_either_way() {
        let secret = "Zx9_Qm-4.kT7";
        assert!(!is_ambiguous("id", secret));
        let header = encode("id", secret);
        let inner = STANDARD
            .decode(header.to_str().unwrap().strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(inner, b"id:Zx9_Qm-4.kT7");
        for changed in ["a+b", "a/b", "a=b", "a%b", "a:b", "a&b", "a b", "a~b"] {
            assert!(is_ambiguous("id", changed), "{changed}");
            assert!(is_ambiguous(changed, secret), "{changed}");
        }
    }

    #[test]
    fn other_schemes_and_garbage_are_told_apart() {
        assert_eq!(decode(b"Bearer abc"), Err(BasicError::NotBasic));
        assert_eq!(decode(b"Basic !!!"), Err(BasicError::Malformed));
        assert_eq!(
            decode(b"basic aWQ6c2VjcmV0"),
            Ok(("id".into(), "secret".into()))
        );
    }
}
