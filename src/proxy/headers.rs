//! The header rewrite, as pure functions over a `HeaderMap`: what the client
//! sent in, what Coupa gets out. No I/O, so every rule is unit-tested here.

use std::net::IpAddr;

use http::header::{
    HeaderName, ACCEPT, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderValue};

pub const X_COUPA_API_KEY: HeaderName = HeaderName::from_static("x-coupa-api-key");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied request id kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// How long the proxy keeps an idle client connection, on HTTP/1.1
/// answers (`listen.keepalive_timeout`).
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ones that
/// clients still send. They describe one connection and never travel on.
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Credentials the client may send that must never reach Coupa: the legacy
/// key (now meaningless upstream) and any authorization of its own.
const CLIENT_CREDENTIALS: [HeaderName; 3] = [X_COUPA_API_KEY, AUTHORIZATION, PROXY_AUTHORIZATION];

static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
static APPLICATION_XML: HeaderValue = HeaderValue::from_static("application/xml");

/// Values decided once at start-up and shared by every request.
#[derive(Debug, Clone)]
pub struct RewriteRules {
    /// `Host` for the upstream (the instance's authority).
    pub upstream_host: HeaderValue,
    /// `X-Forwarded-Proto` of the listener (`http` until inbound TLS).
    pub forwarded_proto: HeaderValue,
}

/// Facts about the client connection, rendered once per connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub ip: IpAddr,
    /// `ip` as a header value, so requests on a keep-alive connection do
    /// not format it again.
    pub ip_header: HeaderValue,
}

impl ClientInfo {
    pub fn new(ip: IpAddr) -> Self {
        let ip_header = HeaderValue::try_from(ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { ip, ip_header }
    }
}

/// What the rewrite did that the request path reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// Fields dropped for a `_` in their name.
    pub dropped: usize,
    /// The `Accept` given to a request that expressed no preference.
    pub defaulted_accept: Option<HeaderValue>,
    /// It carried `X-COUPA-API-KEY` (removed).
    pub sent_legacy_key: bool,
}

/// Rewrites a client request's headers for Coupa. `authority` is the
/// request target's authority (HTTP/2 `:authority`), used for
/// `X-Forwarded-Host` when there is no `Host` header; `default_accept` is
/// the integration's (or `coupa.accept`) for a request that states no
/// preference.
pub fn rewrite_request(
    headers: &mut HeaderMap,
    authority: Option<&http::uri::Authority>,
    rules: &RewriteRules,
    default_accept: &HeaderValue,
    bearer: HeaderValue,
    client: &ClientInfo,
) -> Rewritten {
    let dropped = drop_underscored(headers);
    strip_hop_by_hop(headers);
    // The legacy key's presence is learned here, in the scan that removes
    // it, rather than by a lookup of its own.
    let [sent_legacy_key, ..] = remove_present(headers, &CLIENT_CREDENTIALS);

    // One hashed lookup per field: `insert` hands back what it replaced.
    let original_host = headers
        .insert(HOST, rules.upstream_host.clone())
        .or_else(|| authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }

    let defaulted_accept = choose_accept(
        headers.get_all(ACCEPT),
        headers.get(CONTENT_TYPE),
        default_accept,
    );
    if let Some(accept) = &defaulted_accept {
        headers.insert(ACCEPT, accept.clone());
    }

    match headers.entry(X_FORWARDED_FOR) {
        http::header::Entry::Occupied(mut prior) => {
            let joined = append_forwarded_for(prior.get(), &client.ip_header);
            prior.insert(joined);
        }
        http::header::Entry::Vacant(slot) => {
            slot.insert(client.ip_header.clone());
        }
    }
    headers.insert(X_FORWARDED_PROTO, rules.forwarded_proto.clone());

    headers.insert(AUTHORIZATION, bearer);
    Rewritten {
        dropped,
        defaulted_accept,
        sent_legacy_key,
    }
}

/// Drops fields whose name contains `_` and returns how many. A next hop
/// that maps `_` to `-` (CGI, some WSGI and Rack servers) would read
/// `Transfer_Encoding` as a second framing header or `X_Coupa_Api_Key` as
/// a credential; nginx drops them by default (`underscores_in_headers off`).
fn drop_underscored(headers: &mut HeaderMap) -> usize {
    let has_underscore = |name: &HeaderName| name.as_str().as_bytes().contains(&b'_');
    if !headers.keys().any(has_underscore) {
        return 0;
    }
    let named: Vec<HeaderName> = headers
        .keys()
        .filter(|n| has_underscore(n))
        .cloned()
        .collect();
    named
        .iter()
        .map(|name| match headers.remove(name) {
            Some(_) => 1,
            None => 0,
        })
        .sum()
}

/// The request's id: the client's `X-Request-Id` when it is a sane token,
/// else a fresh random one, which is set on the request so it travels on
/// to Coupa.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID) {
        let sane = !id.is_empty()
            && id.len() <= MAX_REQUEST_ID
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b));
        if sane && headers.get_all(X_REQUEST_ID).iter().count() == 1 {
            return id.clone();
        }
    }
    let id = random_request_id();
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// 128 random bits as 32 lowercase hex digits, rendered without the
/// formatting machinery (this runs for most requests).
fn random_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let random: u128 = rand::random();
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((random >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Rewrites Coupa's response headers for the client.
pub fn rewrite_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

/// Removes the hop-by-hop fields and every field `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let _ = remove_present(headers, &HOP_BY_HOP);
}

/// Removes every field named in `names`. Most requests carry none of them
/// (or one, the legacy key): one walk over the few fields present costs
/// far less than a hashed `remove` per name.
/// Removes each of `names` that is present; which were.
fn remove_present<const N: usize>(headers: &mut HeaderMap, names: &[HeaderName; N]) -> [bool; N] {
    let mut present = [false; N];
    let mut any = false;
    for key in headers.keys() {
        if let Some(i) = names.iter().position(|name| name == key) {
            present[i] = true;
            any = true;
        }
    }
    if any {
        for (name, _) in names.iter().zip(present).filter(|(_, p)| *p) {
            headers.remove(name);
        }
    }
    present
}

/// The `Accept` to send, or `None` to keep the client's own.
///
/// Coupa answers XML when no `Accept` is sent and wants `Accept` and
/// `Content-Type` to agree, so a client that expressed no preference gets
/// the media type of what it sends (when that is JSON or XML), else the
/// configured default.
pub fn choose_accept<'a>(
    accept: impl IntoIterator<Item = &'a HeaderValue>,
    content_type: Option<&HeaderValue>,
    default: &HeaderValue,
) -> Option<HeaderValue> {
    // A client may split its preferences over several Accept lines.
    if accept.into_iter().any(|value| !is_only_wildcard(value)) {
        return None;
    }
    let media_type = content_type
        .and_then(|ct| ct.to_str().ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim());
    Some(match media_type {
        Some(mt) if mt.eq_ignore_ascii_case("application/json") => APPLICATION_JSON.clone(),
        Some(mt) if mt.eq_ignore_ascii_case("application/xml") => APPLICATION_XML.clone(),
        Some(mt) if is_json_or_xml(mt) => {
            HeaderValue::from_str(mt).unwrap_or_else(|_| default.clone())
        }
        _ => default.clone(),
    })
}

/// True for an empty `Accept` value or one made only of `*/*` ranges.
fn is_only_wildcard(accept: &HeaderValue) -> bool {
    let Ok(text) = accept.to_str() else {
        return false;
    };
    text.split(',')
        .map(|range| range.split(';').next().unwrap_or("").trim())
        .all(|range| range.is_empty() || range == "*/*")
}

fn is_json_or_xml(media_type: &str) -> bool {
    let mt = media_type.to_ascii_lowercase();
    mt == "text/xml" || mt.ends_with("+json") || mt.ends_with("+xml")
}

fn append_forwarded_for(prior: &HeaderValue, ip: &HeaderValue) -> HeaderValue {
    let mut joined = Vec::with_capacity(prior.len() + 2 + ip.len());
    joined.extend_from_slice(prior.as_bytes());
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(ip.as_bytes());
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| ip.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RewriteRules {
        RewriteRules {
            upstream_host: HeaderValue::from_static("acme.coupahost.com"),
            forwarded_proto: HeaderValue::from_static("http"),
        }
    }

    fn client() -> ClientInfo {
        ClientInfo::new("10.1.2.3".parse().unwrap())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn rewrite(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = headers(pairs);
        rewrite_request(
            &mut map,
            None,
            &rules(),
            &APPLICATION_JSON,
            HeaderValue::from_static("Bearer tok"),
            &client(),
        );
        map
    }

    #[test]
    fn legacy_key_and_client_credentials_are_replaced_by_the_bearer() {
        let out = rewrite(&[
            ("X-Coupa-Api-Key", "legacy"),
            ("Authorization", "Basic abc"),
            ("Proxy-Authorization", "Basic def"),
        ]);
        assert!(out.get("x-coupa-api-key").is_none());
        assert!(out.get(PROXY_AUTHORIZATION).is_none());
        assert_eq!(out.get_all(AUTHORIZATION).iter().count(), 1);
        assert_eq!(out[AUTHORIZATION], "Bearer tok");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let out = rewrite(&[
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("Connection", "x-other"),
            ("X-Secret-Hop", "1"),
            ("X-Other", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "x-foo"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("X-Kept", "yes"),
        ]);
        for gone in [
            "connection",
            "x-secret-hop",
            "x-other",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(out.get(gone).is_none(), "{gone} survived");
        }
        assert_eq!(out["x-kept"], "yes");
    }

    #[test]
    fn host_is_the_upstream_and_forwarded_headers_are_added() {
        let out = rewrite(&[("Host", "127.0.0.1:8080"), ("X-Forwarded-For", "1.1.1.1")]);
        assert_eq!(out[HOST], "acme.coupahost.com");
        assert_eq!(out[X_FORWARDED_HOST], "127.0.0.1:8080");
        assert_eq!(out[X_FORWARDED_FOR], "1.1.1.1, 10.1.2.3");
        assert_eq!(out[X_FORWARDED_PROTO], "http");

        let out = rewrite(&[]);
        assert_eq!(out[X_FORWARDED_FOR], "10.1.2.3");
        assert!(out.get(X_FORWARDED_HOST).is_none());
    }

    #[test]
    fn http2_authority_becomes_forwarded_host() {
        let mut map = HeaderMap::new();
        let authority: http::uri::Authority = "proxy.local:8443".parse().unwrap();
        rewrite_request(
            &mut map,
            Some(&authority),
            &rules(),
            &APPLICATION_JSON,
            HeaderValue::from_static("Bearer tok"),
            &client(),
        );
        assert_eq!(map[X_FORWARDED_HOST], "proxy.local:8443");
    }

    #[test]
    fn accept_policy() {
        let default = HeaderValue::from_static("application/json");
        let hv = |s: &'static str| HeaderValue::from_static(s);
        // Client's own choice wins.
        assert_eq!(
            choose_accept(Some(&hv("application/xml")), None, &default),
            None
        );
        assert_eq!(
            choose_accept(
                Some(&hv("text/csv")),
                Some(&hv("application/json")),
                &default
            ),
            None
        );
        // Missing or wildcard: follow the body's type, else the default.
        assert_eq!(choose_accept(None, None, &default), Some(default.clone()));
        assert_eq!(
            choose_accept(Some(&hv("*/*")), None, &default),
            Some(default.clone())
        );
        assert_eq!(
            choose_accept(
                Some(&hv("*/*;q=0.8")),
                Some(&hv("application/xml; charset=utf-8")),
                &default
            ),
            Some(hv("application/xml"))
        );
        assert_eq!(
            choose_accept(None, Some(&hv("text/xml")), &default),
            Some(hv("text/xml"))
        );
        assert_eq!(
            choose_accept(None, Some(&hv("Application/JSON;charset=UTF-8")), &default),
            Some(hv("application/json"))
        );
        assert_eq!(
            choose_accept(None, Some(&hv("multipart/form-data; boundary=x")), &default),
            Some(default.clone())
        );
        // Found by the property test: a preference on a second Accept line
        // counts too.
        assert_eq!(
            choose_accept([&hv("*/*"), &hv("application/xml")], None, &default),
            None
        );
    }

    #[test]
    fn request_id_is_kept_when_sane_and_made_otherwise() {
        let mut map = headers(&[("x-request-id", "erp-42.7")]);
        assert_eq!(request_id(&mut map), "erp-42.7");

        for bad in ["", "has space", &"x".repeat(200)] {
            let mut map = headers(&[("x-request-id", bad)]);
            let id = request_id(&mut map);
            assert_eq!(id.len(), 32, "{bad:?}");
            assert_eq!(map.get_all(X_REQUEST_ID).iter().count(), 1);
            assert_eq!(map[X_REQUEST_ID], id);
        }
        let mut map = HeaderMap::new();
        let first = request_id(&mut map);
        assert!(
            first
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)),
            "{first:?}"
        );
        let mut again = HeaderMap::new();
        assert_ne!(first, request_id(&mut again));
    }

    #[test]
    fn underscored_fields_are_dropped_and_counted() {
        let mut map = headers(&[
            ("Transfer_Encoding", "chunked"),
            ("X_Coupa_Api_Key", "legacy"),
            ("X-Custom", "kept"),
        ]);
        let client = ClientInfo::new("192.0.2.1".parse().unwrap());
        let rewritten = rewrite_request(
            &mut map,
            None,
            &rules(),
            &APPLICATION_JSON,
            HeaderValue::from_static("Bearer t"),
            &client,
        );
        assert_eq!(rewritten.dropped, 2);
        assert!(!map.keys().any(|n| n.as_str().contains('_')), "{map:?}");
        assert_eq!(map["x-custom"], "kept");
        // An underscored look-alike is not the legacy key.
        assert!(!rewritten.sent_legacy_key);
    }

    #[test]
    fn the_legacy_key_is_noted_as_it_is_removed() {
        let client = ClientInfo::new("192.0.2.1".parse().unwrap());
        for (sent, fields) in [
            (
                true,
                &[("X-COUPA-API-KEY", "legacy"), ("Accept", "*/*")][..],
            ),
            (false, &[("Accept", "*/*")][..]),
        ] {
            let mut map = headers(fields);
            let rewritten = rewrite_request(
                &mut map,
                None,
                &rules(),
                &APPLICATION_JSON,
                HeaderValue::from_static("Bearer t"),
                &client,
            );
            assert_eq!(rewritten.sent_legacy_key, sent, "{fields:?}");
            assert!(!map.contains_key(X_COUPA_API_KEY));
        }
    }

    #[test]
    fn response_hop_by_hop_is_removed() {
        let mut map = headers(&[
            ("Connection", "close, X-Upstream-Hop"),
            ("X-Upstream-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Type", "application/json"),
        ]);
        rewrite_response(&mut map);
        assert_eq!(map.len(), 1);
        assert_eq!(map[CONTENT_TYPE], "application/json");
    }
}

#[cfg(test)]
mod properties {
    //! Property tests: for any header set a client can send, the rewrite
    //! keeps its promises. Run with the unit tests (`cargo test`).
    use super::*;
    use proptest::prelude::*;

    /// Names a client may send, weighted towards the ones the rewrite
    /// treats specially.
    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "connection", "keep-alive", "proxy-connection", "te", "trailer",
                "transfer-encoding", "upgrade", "x-coupa-api-key", "authorization",
                "proxy-authorization", "host", "accept", "content-type",
                "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-custom",
                "transfer_encoding", "x_coupa_api_key",
            ]).prop_map(str::to_owned),
            1 => "x-[a-z]{1,8}",
            1 => "x_[a-z]{1,8}",
        ]
    }

    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,24}",
            prop::collection::vec(header_name(), 1..4).prop_map(|names| names.join(", ")),
            Just("*/*".to_owned()),
            Just("application/xml; charset=utf-8".to_owned()),
        ]
    }

    const SET_BY_PROXY: [&str; 6] = [
        "host",
        "authorization",
        "accept",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];

    proptest! {
        #[test]
        fn rewrite_keeps_its_promises(
            pairs in prop::collection::vec((header_name(), header_value()), 0..16)
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in &pairs {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
                }
            }
            let original = headers.clone();
            let rules = RewriteRules {
                upstream_host: HeaderValue::from_static("acme.coupahost.com"),
                forwarded_proto: HeaderValue::from_static("http"),
            };
            let client = ClientInfo::new("192.0.2.1".parse().unwrap());
            let bearer = HeaderValue::from_static("Bearer the-token");
            rewrite_request(&mut headers, None, &rules, &APPLICATION_JSON, bearer, &client);

            let auth: Vec<_> = headers.get_all(AUTHORIZATION).iter().cloned().collect();
            prop_assert_eq!(auth, vec![HeaderValue::from_static("Bearer the-token")]);
            prop_assert_eq!(headers.get_all(HOST).iter().count(), 1);
            prop_assert_eq!(&headers[HOST], "acme.coupahost.com");
            let named: Vec<String> = original
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|t| t.trim().to_ascii_lowercase())
                .collect();
            // An Accept the client marked hop-by-hop does not count.
            let client_chose = !named.iter().any(|n| n == "accept")
                && original.get_all(ACCEPT).iter().any(|v| !is_only_wildcard(v));
            let accepts = headers.get_all(ACCEPT).iter().count();
            if client_chose {
                prop_assert_eq!(accepts, original.get_all(ACCEPT).iter().count());
            } else {
                prop_assert_eq!(accepts, 1);
            }
            prop_assert!(!headers.keys().any(|n| n.as_str().contains('_')), "a name with '_' survived");
            for gone in HOP_BY_HOP.iter().chain(&[X_COUPA_API_KEY, PROXY_AUTHORIZATION]) {
                prop_assert!(!headers.contains_key(gone), "{} survived", gone);
            }
            for name in &named {
                if !SET_BY_PROXY.contains(&name.as_str()) && !name.is_empty() {
                    prop_assert!(!headers.contains_key(name.as_str()), "{} named by Connection survived", name);
                }
            }
            // Everything else is passed on untouched.
            for (name, value) in &original {
                let special = name.as_str().contains('_')
                    || HOP_BY_HOP.contains(name)
                    || CLIENT_CREDENTIALS.contains(name)
                    || SET_BY_PROXY.contains(&name.as_str())
                    || named.iter().any(|n| n == name.as_str());
                if !special {
                    prop_assert!(headers.get_all(name).iter().any(|v| v == value), "{} changed", name);
                }
            }
        }
    }
}
