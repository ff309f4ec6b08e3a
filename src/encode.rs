//! Small encodings several modules share: hex of digests (key segments,
//! `api_key_sha256`, local client secrets), text put into HTML pages, an
//! error with its causes on one line, the JSON body of the proxy's own
//! error answers, and a scheme's default port.

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// 64 hex digits as the 32 bytes of a SHA-256 digest.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `text` safe inside an HTML element or a quoted attribute.
pub fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An error and each of its causes on one line (a cause already in the
/// text is not repeated), for logs and answers.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The port a URL of `scheme` means when it names none: 443 for
/// `https`, 80 otherwise (the proxy speaks only HTTP and HTTPS).
pub fn default_port(scheme: Option<&str>) -> u16 {
    match scheme {
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => 443,
        _ => 80,
    }
}

/// The body of every error answer the proxy writes itself:
/// `{"error":CODE,"message":MESSAGE,"source":"coupa-auth-proxy"}`.
pub fn error_json(code: &str, message: &str) -> String {
    serde_json::json!({
        "error": code,
        "message": message,
        "source": "coupa-auth-proxy",
    })
    .to_string()
}

/// [`error_json`] as a `&'static str`, for answers written from constants
/// (a flood of refusals allocates nothing). The message must need no JSON
/// escaping (no `"` or `\\`).
macro_rules! error_json_static {
    ($code:literal, $message:literal) => {
        concat!(
            r#"{"error":""#,
            $code,
            r#"","message":""#,
            $message,
            r#"","source":"coupa-auth-proxy"}"#
        )
    };
}
pub(crate) use error_json_static;

#[cfg(test)]
mod tests {
    #[test]
    fn a_static_error_body_is_the_same_json_as_a_built_one() {
        assert_eq!(
            error_json_static!("malformed_head", "not 'name: value' (a space)"),
            super::error_json("malformed_head", "not 'name: value' (a space)")
        );
    }

    use super::*;

    #[test]
    fn hex_round_trips_through_parse_sha256() {
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
        assert_eq!(parse_sha256(&hex(&[0xab; 32])), Some([0xab; 32]));
        assert_eq!(parse_sha256("zz"), None);
        assert_eq!(parse_sha256(&"g".repeat(64)), None);
    }

    #[test]
    fn html_escapes_markup_and_quotes() {
        assert_eq!(
            html(r#"<a href="x">&</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
