//! `coupa-auth-proxy authorize`: the one-time consent of a user for an
//! authorization-code or device-code credential. The tokens it obtains go
//! to the credential's state file, from which `run` renews them.
//!
//! - Authorization code: a loopback listener on the redirect URI waits
//!   for Coupa's redirect; the URL to open is printed, never opened. PKCE
//!   (S256) binds the code to this run, `state` binds the redirect to it.
//! - Device code: the verification URI and user code are printed, then the
//!   token endpoint is polled as RFC 8628 says, with a countdown.
//!
//! Size: one file for both consent flows, since they share the terminal
//! output, the state-file write and their error advice; split when a third
//! flow arrives.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::pkce::{self, Pkce};
use super::state_file::{self, GrantState, StateFileError};
use crate::config::{Credential, Grant};
use crate::secret::Secret;
use crate::token::client::{FetchError, FetchedToken, TokenClient, TokenRequest};

/// RFC 8628 §3.2: the polling interval when the server names none.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// RFC 8628 §3.5: what each `slow_down` adds to the interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("credential {0} uses the client_credentials grant, which needs no consent")]
    NotAUserGrant(String),
    #[error("cannot listen on {address} for Coupa's redirect (oauth redirect_uri): {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error("no answer within {}; run authorize again", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error(
        "the redirect's state does not match this run's request (an old browser tab, or a forged \
         redirect); nothing was stored: run authorize again"
    )]
    StateMismatch,
    #[error("consent was not given: Coupa answered `{error}`{}", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        error: String,
        description: Option<String>,
    },
    #[error(
        "Coupa issued no refresh token: give the client the offline_access scope in Coupa (and keep it \
         in oauth scopes), then run authorize again"
    )]
    NoRefreshToken,
    #[error("the device code expired before it was approved; run authorize again")]
    Expired,
    #[error("{}", .0.explain())]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error("the consent could not be stored in the cluster state: {0}")]
    Shared(#[from] super::shared::ConsentStateError),
}

/// Runs the consent for `credential` and stores the result in its state
/// file, or with `[cluster]` in the cluster state (`shared`), where every
/// proxy picks it up at its next renewal. Instructions and progress go to
/// stderr.
pub async fn authorize(
    credential: &Credential,
    tls: rustls::ClientConfig,
    timeout: Duration,
    shared: Option<super::shared::SharedConsent>,
) -> Result<GrantState, AuthorizeError> {
    let client = TokenClient::new(&credential.oauth, tls)?;
    let scope = credential.oauth.scopes.join(" ");
    let token = match &credential.oauth.grant {
        Grant::ClientCredentials => {
            return Err(AuthorizeError::NotAUserGrant(credential.name.clone()))
        }
        Grant::AuthorizationCode {
            authorize_url,
            redirect_uri,
            ..
        } => {
            authorization_code(
                &client,
                credential,
                authorize_url,
                redirect_uri,
                &scope,
                timeout,
            )
            .await?
        }
        Grant::DeviceCode {
            device_authorization_url,
            ..
        } => device_code(&client, device_authorization_url, &scope, timeout).await?,
    };
    let refresh_token = token
        .refresh_token
        .clone()
        .ok_or(AuthorizeError::NoRefreshToken)?;
    let state = GrantState {
        client_id: credential.oauth.client_id.clone(),
        scope: token.scope.clone().unwrap_or(scope),
        refresh_token,
        refresh_token_issued_at: SystemTime::now(),
        access_token: Some(token.access_token.clone()),
        access_token_expires_at: Some(token.requested_at_wall + token.expires_in),
    };
    match (shared, credential.oauth.grant.consent()) {
        (Some(shared), _) => shared.write(&state).await?,
        (None, Some(consent)) => {
            create_parent(&consent.state_file)?;
            state_file::save(&consent.state_file, &state)?;
        }
        (None, None) => {}
    }
    Ok(state)
}

/// State files usually live in a directory of their own, made private.
fn create_parent(path: &std::path::Path) -> Result<(), StateFileError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| StateFileError::Write {
        path: path.to_owned(),
        source,
    })
}

/// What the loopback listener learned from the redirect.
type Callback = Result<String, AuthorizeError>;

async fn authorization_code(
    client: &TokenClient,
    credential: &Credential,
    authorize_url: &str,
    redirect_uri: &url::Url,
    scope: &str,
    timeout: Duration,
) -> Result<FetchedToken, AuthorizeError> {
    let host = match redirect_uri.host_str() {
        Some("localhost") | None => "127.0.0.1",
        Some(host) => host.trim_start_matches('[').trim_end_matches(']'),
    };
    let port = redirect_uri.port().unwrap_or(0);
    let listen_error = |source| AuthorizeError::Listen {
        address: format!("{host} port {port}"),
        source,
    };
    let listener = TcpListener::bind((host, port))
        .await
        .map_err(listen_error)?;
    let port = listener.local_addr().map_err(listen_error)?.port();
    let mut redirect = redirect_uri.clone();
    // Port 0 in the config: the port the OS gave us.
    let _ = redirect.set_port(Some(port));
    let redirect = redirect.to_string();

    let pkce = Pkce::generate();
    let state = pkce::random_state();
    let mut url = url::Url::parse(authorize_url).map_err(|e| {
        AuthorizeError::Fetch(FetchError::BadResponse(format!(
            "authorize_url is not a URL: {e}"
        )))
    })?;
    url.query_pairs_mut()
        .append_pair("client_id", &credential.oauth.client_id)
        .append_pair("response_type", "code")
        .append_pair("scope", scope)
        .append_pair("redirect_uri", &redirect)
        .append_pair("code_challenge", &pkce.challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("state", &state);
    eprintln!(
        "credential {}: open this URL in a browser, sign in to Coupa as the user the integration acts \
         for, and approve:\n\n{url}\n\nwaiting for the redirect to {redirect} (gives up in {})",
        credential.name,
        humantime::format_duration(timeout)
    );
    let code = tokio::time::timeout(timeout, wait_for_callback(listener, &redirect, &state))
        .await
        .map_err(|_| AuthorizeError::TimedOut(timeout))??;
    eprintln!("redirect received; exchanging the code for tokens");
    let (token, _) = client
        .request(TokenRequest::AuthorizationCode {
            code: &code,
            redirect_uri: &redirect,
            code_verifier: &pkce.verifier,
        })
        .await?;
    Ok(token)
}

/// Serves the redirect URI until a redirect for `expected_state` (or an
/// error) arrives. Other paths get 404 and do not end the wait.
async fn wait_for_callback(
    listener: TcpListener,
    redirect: &str,
    expected_state: &str,
) -> Callback {
    let path = url::Url::parse(redirect)
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|_| "/".to_owned());
    let (tx, mut rx) = mpsc::channel::<Callback>(1);
    let mut connections = tokio::task::JoinSet::new();
    let result = loop {
        tokio::select! {
            Some(result) = rx.recv() => break result,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let tx = tx.clone();
                let path = path.clone();
                let expected = expected_state.to_owned();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let outcome = callback_outcome(&request, &path, &expected);
                        let tx = tx.clone();
                        async move {
                            let (status, page) = match &outcome {
                                None => (StatusCode::NOT_FOUND, "Not the redirect URI.".to_owned()),
                                Some(Ok(_)) => (StatusCode::OK, "Consent received. You can close this tab; coupa-auth-proxy stores the tokens.".to_owned()),
                                Some(Err(e)) => (StatusCode::BAD_REQUEST, format!("Authorization failed: {e}")),
                            };
                            if let Some(outcome) = outcome {
                                let _ = tx.send(outcome).await;
                            }
                            Ok::<_, Infallible>(page_response(status, &page))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    };
    // Let the browser receive its page before the listener goes away.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    result
}

/// `None` for a request that is not the redirect.
fn callback_outcome(request: &Request<Incoming>, path: &str, expected: &str) -> Option<Callback> {
    if request.uri().path() != path {
        return None;
    }
    let query: HashMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let state_ok = query
        .get("state")
        .is_some_and(|s| constant_time_eq(s.as_bytes(), expected.as_bytes()));
    if !state_ok {
        return Some(Err(AuthorizeError::StateMismatch));
    }
    if let Some(error) = query.get("error") {
        return Some(Err(AuthorizeError::Denied {
            error: error.clone(),
            description: query.get("error_description").cloned(),
        }));
    }
    Some(match query.get("code") {
        Some(code) if !code.is_empty() => Ok(code.clone()),
        _ => Err(AuthorizeError::Denied {
            error: "invalid_request".to_owned(),
            description: Some("the redirect carried no code".to_owned()),
        }),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn page_response(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let escaped = crate::encode::html(text);
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>coupa-auth-proxy</title><p>{escaped}</p>\n"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// RFC 8628 §3.2 device authorization response.
#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    interval: Option<u64>,
}

async fn device_code(
    client: &TokenClient,
    device_authorization_url: &str,
    scope: &str,
    timeout: Duration,
) -> Result<FetchedToken, AuthorizeError> {
    let body = client
        .post_form(
            crate::token::client::Endpoint::DeviceAuthorization,
            device_authorization_url,
            vec![("scope", scope)],
        )
        .await?;
    let device: DeviceAuthorization = serde_json::from_slice(&body).map_err(|e| {
        FetchError::BadResponse(format!("not a device authorization response: {e}"))
    })?;
    let device_code = Secret::new(device.device_code);
    let mut interval = device
        .interval
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_POLL_INTERVAL);
    let lifetime = device
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(timeout)
        .min(timeout);
    let deadline = Instant::now() + lifetime;
    eprintln!(
        "open {} on any device, sign in to Coupa and enter the code\n\n    {}\n",
        device.verification_uri, device.user_code
    );
    if let Some(complete) = &device.verification_uri_complete {
        eprintln!("(or open {complete}, which carries the code)\n");
    }
    let mut countdown = Countdown::new(deadline);
    loop {
        let next_poll = Instant::now() + interval;
        if next_poll >= deadline {
            countdown.finish();
            return Err(if lifetime < timeout {
                AuthorizeError::Expired
            } else {
                AuthorizeError::TimedOut(timeout)
            });
        }
        countdown.wait_until(next_poll).await;
        match client.request(TokenRequest::DeviceCode(&device_code)).await {
            Ok((token, _)) => {
                countdown.finish();
                eprintln!("approved");
                return Ok(token);
            }
            Err(FetchError::OAuth {
                code, description, ..
            }) => match code.as_str() {
                "authorization_pending" => {}
                "slow_down" => interval += SLOW_DOWN_STEP,
                "expired_token" => {
                    countdown.finish();
                    return Err(AuthorizeError::Expired);
                }
                _ => {
                    countdown.finish();
                    return Err(AuthorizeError::Denied {
                        error: code,
                        description,
                    });
                }
            },
            Err(other) => {
                countdown.finish();
                return Err(other.into());
            }
        }
    }
}

/// "waiting for approval: 4:32 left", redrawn in place on a terminal and
/// printed every 30 s otherwise (logs, CI).
struct Countdown {
    deadline: Instant,
    terminal: bool,
    last_line: Option<Instant>,
}

impl Countdown {
    fn new(deadline: Instant) -> Self {
        Self {
            deadline,
            terminal: std::io::stderr().is_terminal(),
            last_line: None,
        }
    }

    fn show(&mut self) {
        let now = Instant::now();
        let due = match self.last_line {
            None => true,
            Some(_) if self.terminal => true,
            Some(last) => now.duration_since(last) >= Duration::from_secs(30),
        };
        if !due {
            return;
        }
        self.last_line = Some(now);
        let left = self.deadline.saturating_duration_since(now).as_secs();
        let line = format!("waiting for approval: {}:{:02} left", left / 60, left % 60);
        let mut stderr = std::io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\r{line} ")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }

    async fn wait_until(&mut self, until: Instant) {
        loop {
            self.show();
            let tick = (Instant::now() + Duration::from_secs(1)).min(until);
            tokio::time::sleep_until(tick).await;
            if Instant::now() >= until {
                return;
            }
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
