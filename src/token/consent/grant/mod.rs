//! Token source for user-consented grants (authorization code, device
//! code): serves the access token the state file holds while it lasts, then
//! renews with the refresh token, persisting every rotated refresh token
//! before the access token that came with it is used.
//!
//! With `[cluster]` the state lives in Redis instead ([`SharedConsent`],
//! `cluster.rs`): the state file is only imported once, on the first
//! start, and every refresh happens under the cluster's lock.
//!
//! The consent itself is given once, interactively, by [`super::authorize`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::{info, warn};

mod cluster;

use super::shared::{ConsentStateError, SharedConsent};
use super::state_file::{self, GrantState, StateFileError};
use crate::config::{Consent, Credential};
use crate::token::client::{FetchError, FetchedToken, TokenClient, TokenRequest};
use crate::token::refresher::TokenSource;
use crate::token::store::{RefreshTokenInfo, TokenStore};

fn shared_error(error: ConsentStateError) -> FetchError {
    FetchError::SharedState(error.to_string())
}

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

/// The grant as this process holds it (the state file's or the shared
/// state's copy, and what is not yet written back).
struct InMemory {
    /// `None` only with `[cluster]` before the shared state was read.
    state: Option<GrantState>,
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
    held: tokio::sync::Mutex<InMemory>,
    /// With `[cluster]`: the state in Redis is the one that counts.
    shared: Option<SharedConsent>,
    /// The OAuth client this consent must belong to.
    client_id: String,
}

impl UserGrantSource {
    /// Loads the consent from the state file; fails when there is none.
    pub fn load(
        client: TokenClient,
        credential: &Credential,
        consent: &Consent,
        config_path: Option<&Path>,
        store: Arc<TokenStore>,
        shared: Option<SharedConsent>,
    ) -> Result<Self, ConsentError> {
        let reauthorize = authorize_command(config_path, credential);
        let consent_error = |source| ConsentError {
            credential: credential.name.clone(),
            source,
            command: reauthorize.clone(),
        };
        let state = match state_file::load(&consent.state_file) {
            Ok(state) => Some(state),
            // With [cluster] the consent may be in Redis only.
            Err(StateFileError::Missing(_)) if shared.is_some() => None,
            Err(error) => return Err(consent_error(error)),
        };
        let snapshot = state.clone();
        if let Some(state) = state
            .as_ref()
            .filter(|s| s.client_id != credential.oauth.client_id)
        {
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
            held: tokio::sync::Mutex::new(InMemory {
                state,
                unsaved: false,
                access_token_served: false,
            }),
            shared,
            client_id: credential.oauth.client_id.clone(),
        };
        if let Some(snapshot) = &snapshot {
            source.publish_refresh_token(snapshot);
        }
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

    fn save(&self, held: &mut InMemory) -> Result<(), FetchError> {
        let Some(state) = &held.state else {
            return Ok(());
        };
        state_file::save(&self.consent.state_file, state).map_err(|e| {
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
        if let Some(shared) = &self.shared {
            return self.fetch_shared(shared).await;
        }
        let mut held = self.held.lock().await;
        if held.unsaved {
            self.save(&mut held)?;
        } else {
            self.adopt_newer_file(&mut held);
        }
        if let Some(token) = take_stored_access_token(&mut held) {
            return Ok(token);
        }
        let token = self.refresh(&mut held).await?;
        self.save(&mut held)?;
        Ok(self.served(held, token, "state file updated"))
    }

    /// Asks Coupa for a new access token with the held refresh token and
    /// puts the rotated state in `held` (not saved yet: the caller saves
    /// before serving).
    async fn refresh(&self, held: &mut InMemory) -> Result<FetchedToken, FetchError> {
        let Some(state) = &held.state else {
            return Err(FetchError::ConsentNeeded {
                reason: "no consent is stored".to_owned(),
                command: self.reauthorize.clone(),
            });
        };
        let (token, _) = self
            .client
            .request(TokenRequest::RefreshToken(&state.refresh_token))
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
        let Some(state) = held.state.as_mut() else {
            return Err(FetchError::BadResponse("consent state vanished".to_owned()));
        };
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
        Ok(token)
    }

    /// A refreshed token, saved: marked served, logged, handed out.
    fn served(
        &self,
        mut held: tokio::sync::MutexGuard<'_, InMemory>,
        token: FetchedToken,
        saved_to: &str,
    ) -> FetchedToken {
        held.access_token_served = true;
        info!(
            credential = %self.credential,
            rotated_refresh_token = token.refresh_token.is_some(),
            "refreshed the access token; {saved_to}"
        );
        let snapshot = held.state.clone();
        drop(held);
        if let Some(snapshot) = &snapshot {
            self.publish_refresh_token(snapshot);
        }
        FetchedToken {
            refresh_token: None,
            ..token
        }
    }

    /// Another process (a new `authorize`, or `token`) may have replaced
    /// the file; its refresh token is then the live one.
    fn adopt_newer_file(&self, held: &mut InMemory) {
        let Some(current) = held.state.as_ref() else {
            return;
        };
        match state_file::load(&self.consent.state_file) {
            Ok(on_disk) if on_disk != *current && on_disk.client_id == current.client_id => {
                info!(
                    credential = %self.credential,
                    state_file = %self.consent.state_file.display(),
                    "the state file changed on disk (a new consent?); using it"
                );
                self.publish_refresh_token(&on_disk);
                held.state = Some(on_disk);
                held.access_token_served = false;
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
fn take_stored_access_token(held: &mut InMemory) -> Option<FetchedToken> {
    if held.access_token_served {
        return None;
    }
    let state = held.state.as_ref()?;
    let access_token = state.access_token.clone()?;
    let now = SystemTime::now();
    let left = state.access_token_expires_at?.duration_since(now).ok()?;
    if left < MIN_STORED_LIFETIME {
        return None;
    }
    held.access_token_served = true;
    Some(FetchedToken {
        access_token,
        expires_in: left,
        scope: Some(state.scope.clone()),
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
