//! Picks a credential's token source by its grant: the token endpoint
//! directly (client credentials), or the consented refresh token
//! ([`UserGrantSource`]).

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::client::{ClientParams, FetchError, FetchedToken, TokenClient};
use super::consent::{ConsentError, SharedConsent, UserGrantSource};
use super::refresher::TokenSource;
use super::shared::SharedTokens;
use super::store::TokenStore;
use crate::cluster::Cluster;
use crate::config::Credential;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot build the token client: {0}")]
    Client(#[from] FetchError),
    #[error(transparent)]
    Consent(#[from] ConsentError),
}

pub enum CredentialSource {
    ClientCredentials(TokenClient),
    /// Client credentials fetched once for every process of the cluster.
    Shared(Box<SharedTokens>),
    /// Boxed: it holds the consent state, and the enum is built once.
    UserGrant(Box<UserGrantSource>),
}

impl CredentialSource {
    /// The source for `credential`; a user-consented one reads its state
    /// file now, so a missing consent stops start-up with advice (with
    /// `cluster`, its state is in Redis and the file is only imported).
    pub fn new(
        credential: &Credential,
        tls: rustls::ClientConfig,
        config_path: Option<&Path>,
        store: Arc<TokenStore>,
        cluster: Option<&Arc<Cluster>>,
    ) -> Result<Self, SourceError> {
        let client = TokenClient::new(&credential.oauth, tls)?;
        Ok(match credential.oauth.grant.consent() {
            None => Self::ClientCredentials(client),
            Some(consent) => Self::UserGrant(Box::new(UserGrantSource::load(
                client,
                credential,
                consent,
                config_path,
                store,
                cluster.map(|c| SharedConsent::new(c.clone(), &credential.oauth)),
            )?)),
        })
    }

    /// With `[cluster]`: client credentials are fetched by one process for
    /// all (user grants keep their own state; see the README).
    pub fn share(
        self,
        cluster: &Arc<Cluster>,
        store: Arc<TokenStore>,
        credential: &Credential,
    ) -> Self {
        match self {
            Self::ClientCredentials(client) => Self::Shared(Box::new(SharedTokens::new(
                client,
                cluster.clone(),
                store,
                &credential.name,
                &credential.oauth,
            ))),
            other => other,
        }
    }

    pub fn client(&self) -> &TokenClient {
        match self {
            Self::ClientCredentials(client) => client,
            Self::Shared(shared) => shared.client(),
            Self::UserGrant(source) => source.client(),
        }
    }

    /// Where a reload puts new request parameters.
    pub fn params_handle(&self) -> Arc<ArcSwap<ClientParams>> {
        self.client().params_handle()
    }
}

impl TokenSource for CredentialSource {
    async fn fetch(&self) -> Result<FetchedToken, FetchError> {
        match self {
            Self::ClientCredentials(client) => client.fetch().await,
            Self::Shared(shared) => shared.fetch().await,
            Self::UserGrant(source) => source.fetch_token().await,
        }
    }

    fn requested_scope(&self) -> String {
        self.client().requested_scope()
    }
}
