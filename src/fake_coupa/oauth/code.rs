//! The authorization-code grant: the authorize endpoint (a test user who
//! always consents, unless told not to) and the code's exchange, with PKCE
//! S256 checked, codes single-use and bound to their redirect URI.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::header::LOCATION;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{Either, Full};

use super::{
    check_scopes, find_client, invalid_grant, oauth_error, query_map, random_token, Refusal,
};
use crate::fake_coupa::{FakeBody, FakeClient, FakeState};

const CODE_LIFETIME: Duration = Duration::from_secs(120);

/// A code handed out by the authorize endpoint, waiting for its exchange.
pub(super) struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    scope: String,
    expires_at: Instant,
}

/// `BASE64URL(SHA256(verifier))`, RFC 7636 §4.2.
pub(crate) fn s256(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn is_loopback_redirect(uri: &url::Url) -> bool {
    uri.scheme() == "http"
        && matches!(
            uri.host_str(),
            Some("127.0.0.1") | Some("localhost") | Some("[::1]")
        )
}

/// `GET /oauth2/authorizations/new`: a test user who is always signed in
/// and consents at once (unless told to deny), answering with the redirect.
pub(in crate::fake_coupa) fn authorize(
    state: &FakeState,
    request: &Request<Incoming>,
) -> Response<FakeBody> {
    let q = query_map(request.uri().query());
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let Some(client) = find_client(state, get("client_id")) else {
        // RFC 6749 §4.1.2.1: never redirect for an unknown client.
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", "unknown client");
    };
    let redirect_uri = get("redirect_uri");
    let Some(redirect_target) = url::Url::parse(redirect_uri)
        .ok()
        .filter(is_loopback_redirect)
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "redirect_uri is not a registered (loopback) URI",
        );
    };
    let redirect = |params: &[(&str, &str)]| {
        let mut target = redirect_target.clone();
        target.query_pairs_mut().extend_pairs(params);
        if !get("state").is_empty() {
            target.query_pairs_mut().append_pair("state", get("state"));
        }
        let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::FOUND;
        if let Ok(location) = HeaderValue::from_str(target.as_str()) {
            response.headers_mut().insert(LOCATION, location);
        }
        response
    };
    if get("response_type") != "code" {
        return redirect(&[("error", "unsupported_response_type")]);
    }
    let challenge = match (get("code_challenge"), get("code_challenge_method")) {
        ("", _) if client.secret.is_empty() => {
            return redirect(&[
                ("error", "invalid_request"),
                ("error_description", "public clients must use PKCE"),
            ])
        }
        ("", _) => None,
        (challenge, "S256") => Some(challenge.to_owned()),
        _ => {
            return redirect(&[
                ("error", "invalid_request"),
                ("error_description", "code_challenge_method must be S256"),
            ])
        }
    };
    let scope = match check_scopes(&client, get("scope")) {
        Ok(scope) => scope,
        Err(_) => return redirect(&[("error", "invalid_scope")]),
    };
    let Ok(mut oauth) = state.oauth.lock() else {
        return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock");
    };
    if oauth.deny_consent {
        return redirect(&[
            ("error", "access_denied"),
            ("error_description", "the user declined"),
        ]);
    }
    let code = random_token("code.", 24);
    oauth.codes.insert(
        code.clone(),
        PendingCode {
            client_id: client.id,
            redirect_uri: redirect_uri.to_owned(),
            challenge,
            scope,
            expires_at: Instant::now() + CODE_LIFETIME,
        },
    );
    drop(oauth);
    redirect(&[("code", &code)])
}

pub(super) fn redeem_code(
    state: &FakeState,
    client: &FakeClient,
    form: &HashMap<String, String>,
) -> Result<(String, bool), Refusal> {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let mut oauth = state
        .oauth
        .lock()
        .map_err(|_| invalid_grant("server lock"))?;
    // Single use: removed whether or not the exchange succeeds.
    let pending = oauth
        .codes
        .remove(field("code"))
        .ok_or_else(|| invalid_grant("unknown or used authorization code"))?;
    if pending.client_id != client.id || Instant::now() >= pending.expires_at {
        return Err(invalid_grant(
            "authorization code expired or not issued to this client",
        ));
    }
    if pending.redirect_uri != field("redirect_uri") {
        return Err(invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    if let Some(challenge) = &pending.challenge {
        if s256(field("code_verifier")) != *challenge {
            return Err(invalid_grant(
                "code_verifier does not match the code_challenge",
            ));
        }
    }
    Ok((pending.scope, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_coupa::{FakeClient, FakeCoupa, FakeCoupaOptions};

    const CLIENT: &str = "user-app";
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
    const REDIRECT: &str = "http://127.0.0.1:1/callback";

    async fn public_client_fake() -> FakeCoupa {
        FakeCoupa::start(FakeCoupaOptions {
            clients: vec![FakeClient {
                id: CLIENT.to_owned(),
                secret: String::new(),
                scopes: vec!["core.invoice.read".into(), "offline_access".into()],
            }],
            token_lifetime: std::time::Duration::from_secs(86_399),
            tls: None,
        })
        .await
        .unwrap()
    }

    /// `exchange_by_hand` for the client: the status and the error code.
    async fn exchange(
        fake: &FakeCoupa,
        code: &str,
        verifier: &str,
        redirect: &str,
    ) -> (u16, Option<String>) {
        let (status, body) = fake
            .exchange_by_hand(CLIENT, code, verifier, redirect)
            .await
            .unwrap();
        (status, body["error"].as_str().map(str::to_owned))
    }

    async fn code_for(fake: &FakeCoupa) -> String {
        fake.code_by_hand(CLIENT, VERIFIER, REDIRECT).await.unwrap()
    }

    /// The fake plays Coupa's side of PKCE as RFC 7636 and RFC 6749 say,
    /// so the proxy's `authorize` is tested against a strict server.
    #[tokio::test]
    async fn the_verifier_and_redirect_must_match_and_codes_are_single_use() {
        let fake = public_client_fake().await;
        let invalid_grant = Some("invalid_grant".to_owned());
        let code = code_for(&fake).await;
        let wrong = "wrong-verifier-wrong-verifier-wrong-verifier-1";
        assert_eq!(
            exchange(&fake, &code, wrong, REDIRECT).await,
            (400, invalid_grant.clone())
        );
        // The failed exchange used the code up.
        assert_eq!(exchange(&fake, &code, VERIFIER, REDIRECT).await.0, 400);

        let code = code_for(&fake).await;
        let other = "http://127.0.0.1:2/other";
        assert_eq!(
            exchange(&fake, &code, VERIFIER, other).await,
            (400, invalid_grant.clone()),
            "redirect_uri must match"
        );

        let code = code_for(&fake).await;
        assert_eq!(
            exchange(&fake, &code, VERIFIER, REDIRECT).await,
            (200, None)
        );
        assert_eq!(
            exchange(&fake, &code, VERIFIER, REDIRECT).await,
            (400, invalid_grant)
        );
    }

    #[test]
    fn s256_matches_rfc_7636_appendix_b() {
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }
}
