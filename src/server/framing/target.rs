//! Request targets that lenient servers take but hyper's URI type refuses.
//!
//! Coupa documents its `fields` parameter in raw JSON-like syntax
//! (`?fields=["id",{"supplier":["name"]}]`), and Java's `HttpURLConnection`,
//! curl and hand-built request lines send it unencoded. nginx (and so a
//! Rails application behind it) accepts `"`, `<`, `>` and `` ` `` in a
//! target and bytes that are not UTF-8; the `http` crate refuses some of
//! them (which depends on whether the byte is in the path or the query),
//! and hyper then answers a bare 400. The guard percent-encodes exactly
//! those bytes before hyper reads the head, so Coupa decodes the same path
//! and parameters (Rack decodes `%22` and `"` alike) and every other byte
//! is forwarded as sent. Nothing that makes a request line ambiguous is
//! touched: spaces, control characters and line ends never reach here
//! (the head parser refuses them first).

/// Bytes the `http` crate refuses in a path (before `?`).
const fn path_refuses(byte: u8) -> bool {
    matches!(byte, b'<' | b'>' | b'`')
}

/// Bytes the `http` crate refuses in a query (after `?`).
const fn query_refuses(byte: u8) -> bool {
    matches!(byte, b'"' | b'<' | b'>')
}

/// Where the `http` crate stops reading a target: a fragment is dropped,
/// as a server behind nginx drops it.
const FRAGMENT: u8 = b'#';

/// Whether `target` must be encoded before hyper can hold it.
pub(super) fn needs_encoding(target: &[u8]) -> bool {
    let mut in_query = false;
    let mut high = false;
    for &byte in target {
        match byte {
            FRAGMENT => break,
            b'?' => in_query = true,
            0x80.. => high = true,
            _ if in_query && query_refuses(byte) => return true,
            _ if !in_query && path_refuses(byte) => return true,
            _ => {}
        }
    }
    high && std::str::from_utf8(until_fragment(target)).is_err()
}

fn until_fragment(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|&b| b == FRAGMENT)
        .unwrap_or(target.len());
    &target[..end]
}

/// Appends `target` to `out` with the bytes hyper refuses percent-encoded
/// (and every byte above 0x7F when the target is not UTF-8).
pub(super) fn encode_into(target: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let encode_high = std::str::from_utf8(until_fragment(target)).is_err();
    let mut in_query = false;
    let mut in_fragment = false;
    for &byte in target {
        in_fragment |= byte == FRAGMENT;
        in_query |= byte == b'?';
        let refused = !in_fragment
            && match byte {
                0x80.. => encode_high,
                _ if in_query => query_refuses(byte),
                _ => path_refuses(byte),
            };
        if refused {
            out.extend_from_slice(&[
                b'%',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xF)],
            ]);
        } else {
            out.push(byte);
        }
    }
}

/// A head whose target the head parser refused only for not being UTF-8
/// (latin-1 from an old client): the target's range in `head` and a copy
/// of `head` with the target encoded, which the parser takes. `None` when
/// the request line is malformed in any other way.
pub(super) fn with_target_encoded(head: &[u8]) -> Option<(std::ops::Range<usize>, Vec<u8>)> {
    // The line may not be whole yet: the target is, once a space ends it.
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let start = line.iter().position(|&b| b == b' ')? + 1;
    let end = start + line[start..].iter().position(|&b| b == b' ')?;
    let target = &line[start..end];
    let plausible = target.iter().all(|&b| b > b' ' && b != 0x7F);
    if !plausible || std::str::from_utf8(target).is_ok() {
        return None;
    }
    let mut copy = Vec::with_capacity(head.len() + 3 * target.len());
    copy.extend_from_slice(&head[..start]);
    encode_into(target, &mut copy);
    copy.extend_from_slice(&head[end..]);
    Some((start..end, copy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::PathAndQuery;

    fn encoded(target: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(target, &mut out);
        out
    }

    fn holds(target: &[u8]) -> bool {
        PathAndQuery::try_from(target).is_ok()
    }

    /// Every printable byte in a path segment and in a query value: the
    /// ones flagged are exactly the ones the `http` crate refuses, and
    /// encoding makes them acceptable. If a new `http` release accepts or
    /// refuses another byte, this fails and the tables above follow.
    #[test]
    fn exactly_what_the_uri_type_refuses_is_encoded() {
        for byte in 0x21u8..=0x7E {
            if matches!(byte, b'?' | b'#') {
                continue;
            }
            let in_path = [b"/a".as_slice(), &[byte], b"b"].concat();
            let in_query = [b"/a?q=".as_slice(), &[byte], b"&r=1"].concat();
            for target in [in_path, in_query] {
                let shown = String::from_utf8_lossy(&target).into_owned();
                assert_eq!(
                    needs_encoding(&target),
                    !holds(&target),
                    "{shown}: flagged iff refused"
                );
                let out = encoded(&target);
                assert!(holds(&out), "{shown} → {}", String::from_utf8_lossy(&out));
                if !needs_encoding(&target) {
                    assert_eq!(out, target, "{shown} is forwarded as sent");
                }
            }
        }
    }

    #[test]
    fn coupas_fields_syntax_decodes_to_what_was_sent() {
        let raw = br#"/api/invoices?fields=["id","invoice-number",{"supplier":["name"]}]&name="ACME<Europe>""#;
        assert!(needs_encoding(raw));
        let out = encoded(raw);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#"/api/invoices?fields=[%22id%22,%22invoice-number%22,{%22supplier%22:[%22name%22]}]&name=%22ACME%3CEurope%3E%22"#
        );
        let decoded: Vec<(String, String)> =
            form_urlencoded::parse(out.split(|&b| b == b'?').nth(1).unwrap())
                .into_owned()
                .collect();
        assert_eq!(
            decoded,
            [
                (
                    "fields".to_owned(),
                    r#"["id","invoice-number",{"supplier":["name"]}]"#.to_owned()
                ),
                ("name".to_owned(), r#""ACME<Europe>""#.to_owned())
            ]
        );
    }

    #[test]
    fn utf8_is_kept_and_other_high_bytes_are_encoded() {
        let utf8 = "/api/suppliers?name=Müller".as_bytes();
        assert!(!needs_encoding(utf8), "UTF-8 is held as sent");
        let latin1 = b"/api/suppliers?name=M\xfcller";
        assert!(needs_encoding(latin1));
        assert_eq!(encoded(latin1), b"/api/suppliers?name=M%FCller");
        assert!(holds(&encoded(latin1)));
    }

    #[test]
    fn a_latin1_target_is_encoded_in_a_copy_of_its_head() {
        let head = b"GET /a?n=M\xfcller HTTP/1.1\r\nHost: x\r\n\r\n";
        let (range, copy) = with_target_encoded(head).unwrap();
        assert_eq!(&head[range], b"/a?n=M\xfcller");
        assert_eq!(copy, b"GET /a?n=M%FCller HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(with_target_encoded(b"GET /a\x01\xfc HTTP/1.1\r\n"), None);
        assert_eq!(
            with_target_encoded("GET /Müller HTTP/1.1\r\n".as_bytes()),
            None
        );
    }

    #[test]
    fn a_fragment_is_left_for_the_uri_type_to_drop() {
        let target = b"/api/a#x<y";
        assert!(!needs_encoding(target));
        assert_eq!(encoded(target), target);
        assert!(needs_encoding(b"/api/a<b#x"));
        assert_eq!(encoded(b"/api/a<b#x<"), b"/api/a%3Cb#x<");
    }
}
