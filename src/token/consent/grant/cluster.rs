//! The grant with `[cluster]`: the state in Redis is the one that counts.
//! Adopt what another process stored; refresh only under the cluster's
//! lock, after reading again; write the rotated state before its token is
//! used; import the state file's consent once.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{shared_error, take_stored_access_token, InMemory, UserGrantSource};
use crate::token::client::{FetchError, FetchedToken};
use crate::token::consent::shared::SharedConsent;
use crate::token::consent::state_file::GrantState;

impl UserGrantSource {
    /// [`Self::fetch_token`] with the state in Redis: adopt what another
    /// process stored; refresh only under the lock, after reading again;
    /// write the rotated state before its token is used.
    pub(super) async fn fetch_shared(
        &self,
        shared: &SharedConsent,
    ) -> Result<FetchedToken, FetchError> {
        let announcements = shared.cluster.announcements(&shared.digest);
        let give_up = Instant::now() + shared.lock_ttl * 2;
        let mut held = self.held.lock().await;
        loop {
            let announced = announcements.notified();
            tokio::pin!(announced);
            announced.as_mut().enable();
            if held.unsaved {
                // A refresh whose state could not be written: ours is the
                // live refresh token, so it goes to Redis first.
                if let Some(state) = &held.state {
                    shared.write(state).await.map_err(shared_error)?;
                }
                held.unsaved = false;
            }
            self.adopt_shared(shared, &mut held).await?;
            if let Some(token) = take_stored_access_token(&mut held) {
                return Ok(token);
            }
            let lock = shared.lock_key();
            if shared
                .cluster
                .try_lock(&lock, shared.lock_ttl)
                .await
                .map_err(|e| shared_error(e.into()))?
            {
                let refreshed = shared
                    .cluster
                    .while_locked(
                        &lock,
                        shared.lock_ttl,
                        self.refresh_locked(shared, &mut held),
                    )
                    .await;
                shared.cluster.unlock(&lock).await;
                let token = refreshed?;
                return Ok(match token {
                    Some(token) => self.served(held, token, "cluster state updated"),
                    None => take_stored_access_token(&mut held).ok_or_else(|| {
                        FetchError::SharedState(
                            "the consent stored in Redis has no usable access token".into(),
                        )
                    })?,
                });
            }
            if Instant::now() >= give_up {
                return Err(FetchError::SharedState(
                    "another process holds the refresh lock and stored no new token".into(),
                ));
            }
            tokio::select! {
                _ = &mut announced => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Under the lock: read again (another process may just have
    /// refreshed: then `None`, serve what it stored); else refresh and
    /// write before the new token is used.
    async fn refresh_locked(
        &self,
        shared: &SharedConsent,
        held: &mut InMemory,
    ) -> Result<Option<FetchedToken>, FetchError> {
        if self.adopt_shared(shared, held).await? {
            return Ok(None);
        }
        let token = self.refresh(held).await?;
        if let Some(state) = &held.state {
            shared.write(state).await.map_err(|e| {
                FetchError::SharedState(format!(
                    "{e}; the renewed token is held back until Redis has the rotated refresh token"
                ))
            })?;
        }
        held.unsaved = false;
        Ok(Some(token))
    }

    /// Takes the stored state when it differs from the held one (imports
    /// the held one when Redis has none); true if it adopted a newer one.
    async fn adopt_shared(
        &self,
        shared: &SharedConsent,
        held: &mut InMemory,
    ) -> Result<bool, FetchError> {
        match shared.read().await.map_err(shared_error)? {
            Some(stored) if lost_in_redis(held.state.as_ref(), &stored) => {
                // Redis holds a consent older than ours: our write of the
                // rotated refresh token was lost (a failover to a replica
                // that had not received it). Ours is the live one.
                if let Some(state) = &held.state {
                    warn!(
                        credential = %self.credential,
                        "the cluster state holds an older refresh token than this process (a Redis failover lost a write?); writing ours back"
                    );
                    shared.write(state).await.map_err(shared_error)?;
                }
                Ok(false)
            }
            Some(stored) if held.state.as_ref() != Some(&stored) => {
                if stored.client_id != self.client_id {
                    return Err(FetchError::SharedState(format!(
                        "the consent in Redis is for client {}, not this credential's",
                        stored.client_id
                    )));
                }
                held.state = Some(stored);
                held.access_token_served = false;
                if let Some(state) = &held.state {
                    self.publish_refresh_token(state);
                }
                Ok(true)
            }
            Some(_) => Ok(false),
            None => match &held.state {
                Some(local) => {
                    if shared.import(local).await.map_err(shared_error)? {
                        info!(
                            credential = %self.credential,
                            state_file = %self.consent.state_file.display(),
                            "imported the state file's consent into the cluster state"
                        );
                    }
                    Ok(false)
                }
                None => Err(FetchError::ConsentNeeded {
                    reason: "no consent is stored in the cluster state or the state file"
                        .to_owned(),
                    command: self.reauthorize.clone(),
                }),
            },
        }
    }
}

/// Whether `stored` is an earlier state of the same consent than `held`:
/// its refresh token was issued before ours (whole seconds, as stored).
fn lost_in_redis(held: Option<&GrantState>, stored: &GrantState) -> bool {
    let Some(held) = held else {
        return false;
    };
    let seconds = |state: &GrantState| {
        state
            .refresh_token_issued_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    held.client_id == stored.client_id
        && held.refresh_token != stored.refresh_token
        && seconds(stored) < seconds(held)
}
