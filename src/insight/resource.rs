//! The resource a request path names, for the migration view: the segment
//! after `/api/` (`/api/invoices/123/approve` → `invoices`). Ids and
//! everything after them never reach a counter, a label or the status page.

/// Label of paths outside `/api/` (the proxy's own `/oauth2/token`, `/`).
pub const OUTSIDE_API: &str = "(outside /api)";
/// Label of everything past the per-integration cap, and of segments that
/// do not look like a resource name (an id, an encoded or odd segment).
pub const OTHER: &str = "other";

/// The longest name counted as a resource; longer is [`OTHER`].
const MAX_NAME: usize = 64;

/// What a path is, as the view counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A resource name: lowercase letters, digits and `_`, starting with a
    /// letter, as Coupa names them.
    Named(&'a str),
    /// Under `/api/` but not a resource name.
    Other,
    /// Not under `/api/`.
    OutsideApi,
}

impl Resource<'_> {
    pub fn label(&self) -> &str {
        match self {
            Resource::Named(name) => name,
            Resource::Other => OTHER,
            Resource::OutsideApi => OUTSIDE_API,
        }
    }
}

/// The resource of `path` (the path only: the query string is never read).
pub fn resource_of(path: &str) -> Resource<'_> {
    let Some(rest) = path.strip_prefix("/api/") else {
        return Resource::OutsideApi;
    };
    // One pass over the name's bytes: this runs on every request.
    // `invoices.json` is `invoices` asked for in another format.
    let bytes = rest.as_bytes();
    let mut end = 0;
    while end < bytes.len() && bytes[end] != b'/' && bytes[end] != b'.' {
        let b = bytes[end];
        let allowed = b.is_ascii_lowercase() || (end > 0 && (b.is_ascii_digit() || b == b'_'));
        if !allowed || end == MAX_NAME {
            return Resource::Other;
        }
        end += 1;
    }
    match rest.get(..end) {
        Some(name) if !name.is_empty() => Resource::Named(name),
        _ => Resource::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_segment_after_api_names_the_resource_and_ids_are_dropped() {
        for (path, expected) in [
            ("/api/invoices", Resource::Named("invoices")),
            ("/api/invoices/", Resource::Named("invoices")),
            ("/api/invoices/123", Resource::Named("invoices")),
            ("/api/invoices/123/approve", Resource::Named("invoices")),
            (
                "/api/purchase_orders/9/receive",
                Resource::Named("purchase_orders"),
            ),
            ("/api/invoices.json", Resource::Named("invoices")),
            ("/api/lookup_values2", Resource::Named("lookup_values2")),
        ] {
            assert_eq!(resource_of(path), expected, "{path}");
        }
    }

    #[test]
    fn ids_encoded_or_odd_segments_are_other_and_non_api_paths_are_outside() {
        for path in [
            "/api/",
            "/api/123",
            "/api/Invoices",
            "/api/%69nvoices",
            "/api/_status",
            "/api/in-voices",
            &format!("/api/{}", "a".repeat(65)),
        ] {
            assert_eq!(resource_of(path), Resource::Other, "{path}");
        }
        for path in ["/", "/oauth2/token", "/apis/x", "/api"] {
            assert_eq!(resource_of(path), Resource::OutsideApi, "{path}");
        }
        assert_eq!(resource_of("/api/x").label(), "x");
        assert_eq!(Resource::Other.label(), "other");
    }
}
