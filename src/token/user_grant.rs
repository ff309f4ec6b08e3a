//! Token source for user-consented grants (authorization code, device
//! code): serves the access token the state file holds while it lasts, then
//! renews with the refresh token, persisting every rotated refresh token
//! before the access token that came with it is used.
//!
//! The consent itself is given once, interactively, by [`crate::authorize`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{FetchError, FetchedToken, TokenClient, TokenRequest};
use super::refresher::TokenSource;
use super::state_file::{self, GrantState, StateFileError};
use super::store::{RefreshTokenInfo, TokenStore};
use crate::config::{Consent, Credential};

/// A stored access token with less left than this is not worth installing.
const MIN_STORED_LIFETIME: Duration = Duration::from_secs(120);

/// Why a user-consented credential cannot start.
#[derive(Debug, thiserror::Error)]
#[error("credential {credential}: {source}; run `{command}` to give consent")]
pub struct ConsentError {
    pub credential: String,
    pub source: StateFileError,
    pub command: String,
}

/// The command that (re)gives consent for `credential`.
pub fn authorize_command(config_path: Option<&Path>, credential: &Credential) -> String {
    let config = config_path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<config file>".to_owned());
    format!(
        "coupa-auth-proxy authorize --config {config} --credential {}",
        credential.name
    )
}

struct Held {
    state: GrantState,
    /// The in-memory state is newer than the file (a write failed).
    unsaved: bool,
    /// The stored access token was handed out already; the next fetch must
    /// renew (after a 401, handing it out again would loop).
    access_token_served: bool,
}

/// Renews a user-consented credential's tokens.
pub struct UserGrantSource {
    client: TokenClient,
    credential: String,
    consent: Consent,
    reauthorize: String,
    store: Arc<TokenStore>,
    held: tokio::sync::Mutex<Held>,
}

impl UserGrantSource {
    /// Loads the consent from the state file; fails when there is none.
    pub fn load(
        client: TokenClient,
        credential: &Credential,
        consent: &Consent,
        config_path: Option<&Path>,
        store: Arc<TokenStore>,
    ) -> Result<Self, ConsentError> {
        let reauthorize = authorize_command(config_path, credential);
        let consent_error = |source| ConsentError {
            credential: credential.name.clone(),
            source,
            command: reauthorize.clone(),
        };
        let state = state_file::load(&consent.state_file).map_err(consent_error)?;
        let snapshot = state.clone();
        if state.client_id != credential.oauth.client_id {
            return Err(consent_error(StateFileError::Corrupt {
                path: consent.state_file.clone(),
                reason: format!(
                    "it holds a consent for client {}, not for oauth client_id {}",
                    state.client_id, credential.oauth.client_id
                ),
            }));
        }
        let source = Self {
            client,
            credential: credential.name.clone(),
            consent: consent.clone(),
            reauthorize,
            store,
            held: tokio::sync::Mutex::new(Held {
                state,
                unsaved: false,
                access_token_served: false,
            }),
        };
        source.publish_refresh_token(&snapshot);
        Ok(source)
    }

    pub fn client(&self) -> &TokenClient {
        &self.client
    }

    fn refresh_info(&self, state: &GrantState) -> RefreshTokenInfo {
        RefreshTokenInfo {
            expires_at: state.refresh_token_issued_at + self.consent.refresh_token_lifetime,
            reauthorize: self.reauthorize.clone(),
        }
    }

    /// Tells the store (readiness, metrics) and, near the end, the log.
    fn publish_refresh_token(&self, state: &GrantState) {
        let info = self.refresh_info(state);
        if let Some(warning) = info.warning(SystemTime::now()) {
            warn!(credential = %self.credential, "{warning}");
        }
        self.store.set_refresh_token(info);
    }

    fn save(&self, held: &mut Held) -> Result<(), FetchError> {
        state_file::save(&self.consent.state_file, &held.state).map_err(|e| {
            FetchError::StateFile(format!(
                "{e}; the renewed token is held back until it is saved, so a restart cannot lose \
                 the rotated refresh token"
            ))
        })?;
        held.unsaved = false;
        Ok(())
    }

    /// The next access token: the stored one if still good and not yet
    /// served, else a refresh.
    pub async fn fetch_token(&self) -> Result<FetchedToken, FetchError> {
        let mut held = self.held.lock().await;
        if held.unsaved {
            self.save(&mut held)?;
        } else {
            self.adopt_newer_file(&mut held);
        }
        if let Some(token) = take_stored_access_token(&mut held) {
            return Ok(token);
        }
        let (token, _) = self
            .client
            .request(TokenRequest::RefreshToken(&held.state.refresh_token))
            .await
            .map_err(|e| match e {
                FetchError::OAuth { code, .. } if code == "invalid_grant" => {
                    FetchError::ConsentNeeded {
                        reason:
                            "Coupa rejected the refresh token (expired, revoked, or rotated by \
                                 another copy of this state file)"
                                .to_owned(),
                        command: self.reauthorize.clone(),
                    }
                }
                other => other,
            })?;
        let now = SystemTime::now();
        let state = &mut held.state;
        if let Some(rotated) = token.refresh_token.clone() {
            state.refresh_token = rotated;
            state.refresh_token_issued_at = now;
        }
        if let Some(scope) = &token.scope {
            state.scope = scope.clone();
        }
        state.access_token = Some(token.access_token.clone());
        state.access_token_expires_at = Some(token.requested_at_wall + token.expires_in);
        held.unsaved = true;
        held.access_token_served = false;
        let rotated = token.refresh_token.is_some();
        self.save(&mut held)?;
        held.access_token_served = true;
        info!(
            credential = %self.credential,
            rotated_refresh_token = rotated,
            state_file = %self.consent.state_file.display(),
            "refreshed the access token; state file updated"
        );
        let snapshot = held.state.clone();
        drop(held);
        self.publish_refresh_token(&snapshot);
        Ok(FetchedToken {
            refresh_token: None,
            ..token
        })
    }

    /// Another process (a new `authorize`, or `token`) may have replaced
    /// the file; its refresh token is then the live one.
    fn adopt_newer_file(&self, held: &mut Held) {
        match state_file::load(&self.consent.state_file) {
            Ok(on_disk) if on_disk != held.state && on_disk.client_id == held.state.client_id => {
                info!(
                    credential = %self.credential,
                    state_file = %self.consent.state_file.display(),
                    "the state file changed on disk (a new consent?); using it"
                );
                held.state = on_disk;
                held.access_token_served = false;
                self.publish_refresh_token(&held.state);
            }
            Ok(_) => {}
            Err(e) => warn!(
                credential = %self.credential,
                error = %e,
                "cannot re-read the state file; renewing with the refresh token held in memory"
            ),
        }
    }
}

/// The stored access token, once, if it has a useful life left.
fn take_stored_access_token(held: &mut Held) -> Option<FetchedToken> {
    if held.access_token_served {
        return None;
    }
    let access_token = held.state.access_token.clone()?;
    let now = SystemTime::now();
    let left = held
        .state
        .access_token_expires_at?
        .duration_since(now)
        .ok()?;
    if left < MIN_STORED_LIFETIME {
        return None;
    }
    held.access_token_served = true;
    Some(FetchedToken {
        access_token,
        expires_in: left,
        scope: Some(held.state.scope.clone()),
        refresh_token: None,
        requested_at: Instant::now(),
        requested_at_wall: now,
    })
}

impl TokenSource for UserGrantSource {
    fn fetch(&self) -> impl std::future::Future<Output = Result<FetchedToken, FetchError>> + Send {
        self.fetch_token()
    }

    fn requested_scope(&self) -> String {
        self.client.requested_scope()
    }
}
