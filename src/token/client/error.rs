//! What can go wrong with a token request, worded for the operator: each
//! failure names the endpoint or setting involved and, where the cause is
//! known, the fix.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("token endpoint unreachable: {0}")]
    Network(String),
    /// The egress proxy failed the tunnel to the token endpoint.
    #[error("token endpoint unreachable: {0}")]
    Egress(crate::egress::EgressError),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("token endpoint refused the request: HTTP {status}, OAuth error `{code}`{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    OAuth {
        status: u16,
        code: String,
        description: Option<String>,
        /// The secret went in HTTP Basic and RFC 6749's encoding changed
        /// it: a server that does not decode sees another secret.
        ambiguous_basic: bool,
    },
    /// Token requests never follow redirects: the secret must not be
    /// re-sent to a location nobody configured.
    #[error("the {} redirected (HTTP {status}) to {location}: set {} to it", endpoint.name(), endpoint.setting())]
    Redirected {
        endpoint: Endpoint,
        status: u16,
        location: String,
    },
    #[error("token endpoint answered HTTP {status} without an OAuth error body")]
    Http { status: u16 },
    #[error("token endpoint answered something unusable: {0}")]
    BadResponse(String),
    /// A user-consented grant needs a new consent: the refresh token was
    /// rejected, or there is none.
    #[error("{reason}; run `{command}` to give consent again")]
    ConsentNeeded { reason: String, command: String },
    /// The state file of a user-consented grant could not be written; the
    /// new token is held back until it is, or a restart would lose it.
    #[error("{0}")]
    StateFile(String),
    /// A user-consented grant shared through `[cluster]` cannot renew now
    /// (Redis away, or another process renewing for too long).
    #[error("{0}; the current access token keeps serving")]
    SharedState(String),
}

/// Which OAuth endpoint a form goes to, for errors that name its setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    DeviceAuthorization,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Token => "token endpoint",
            Endpoint::DeviceAuthorization => "device authorization endpoint",
        }
    }

    fn setting(self) -> &'static str {
        match self {
            Endpoint::Token => "oauth.token_url",
            Endpoint::DeviceAuthorization => "oauth.device_authorization_url",
        }
    }
}

impl FetchError {
    /// What the user should change, when the cause is known.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            FetchError::OAuth {
                code,
                ambiguous_basic: true,
                ..
            } if code == "invalid_client" => Some(
                "the secret holds characters that HTTP Basic encodes (RFC 6749 §2.3.1 form-urlencodes \
                 the id and secret; this proxy does, some servers such as Doorkeeper do not decode \
                 them): set oauth.client_auth = \"body\" (the default, unambiguous), or check \
                 oauth.client_id and the secret against Coupa",
            ),
            FetchError::OAuth { code, .. } => match code.as_str() {
                "invalid_client" => Some(
                    "the client id or secret is wrong: check oauth.client_id and the secret against \
                     Coupa (Setup > Integrations > OAuth2/OpenID Connect Clients); \
                     with oauth.client_auth = \"basic\" the secret goes in a header instead of the form",
                ),
                "invalid_scope" => Some(
                    "a scope in oauth.scopes is not assigned to this client: add it to the client in \
                     Coupa or remove it from oauth.scopes",
                ),
                "unauthorized_client" => Some(
                    "the client may not use this grant: set the client's grant type in Coupa to match \
                     oauth.grant (Client credentials, Authorization code or Device code)",
                ),
                "unsupported_grant_type" => Some(
                    "the endpoint does not accept this grant: check oauth.token_url points at \
                     https://<instance>/oauth2/token",
                ),
                "invalid_grant" => Some(
                    "the authorization code, device code or refresh token was rejected: it expired, \
                     was used already or was revoked; run `coupa-auth-proxy authorize` again",
                ),
                "invalid_request" => Some(
                    "the endpoint rejected the request's form: if the description mentions multiple \
                     credentials, check oauth.client_auth",
                ),
                _ => None,
            },
            FetchError::Http { status: 404 } => {
                Some("no token endpoint at oauth.token_url: check coupa.base_url / oauth.token_url")
            }
            FetchError::Http { status: 401 | 403 } => {
                Some("the endpoint rejected the client: check oauth.client_id and the secret")
            }
            FetchError::Network(_) | FetchError::Timeout(_) => Some(
                "check that coupa.base_url names a reachable instance and that its certificate is \
                 trusted (coupa.ca_file for a private CA)",
            ),
            _ => None,
        }
    }

    /// Failures that only a change of configuration (here or in Coupa) can
    /// fix; retrying them soon is pointless.
    pub fn is_configuration_error(&self) -> bool {
        match self {
            FetchError::OAuth { code, .. } => matches!(
                code.as_str(),
                "invalid_client" | "invalid_scope" | "unauthorized_client" | "invalid_grant"
            ),
            FetchError::ConsentNeeded { .. } | FetchError::Redirected { .. } => true,
            _ => false,
        }
    }

    /// The metrics label of this failure.
    pub fn outcome(&self) -> &str {
        match self {
            FetchError::Network(_) | FetchError::Timeout(_) => "network",
            FetchError::Egress(_) => "egress_proxy",
            FetchError::OAuth { code, .. } => code,
            FetchError::Http { .. } => "http_error",
            FetchError::Redirected { .. } => "redirect",
            FetchError::BadResponse(_) => "bad_response",
            FetchError::ConsentNeeded { .. } => "consent_needed",
            FetchError::StateFile(_) => "state_file",
            FetchError::SharedState(_) => "cluster_state",
        }
    }

    /// The message plus the hint, as one line for logs and the CLI.
    pub fn explain(&self) -> String {
        match self.hint() {
            Some(hint) => format!("{self}; fix: {hint}"),
            None => self.to_string(),
        }
    }
}

/// An error with its causes, e.g. "error sending request: connection refused".
pub(crate) use crate::encode::error_chain;
