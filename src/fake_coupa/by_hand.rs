//! The OAuth steps a client of the instance takes, by hand: for tests of
//! the fake itself, consents made at it, and clients outside the proxy.

use http::header::LOCATION;

use super::FakeCoupa;

/// Why a step taken by hand failed.
#[derive(Debug, thiserror::Error)]
pub enum ByHandError {
    #[error("the fake did not answer: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the authorize endpoint gave no code: {0}")]
    NoCode(String),
    #[error("the token endpoint gave no access token: {0}")]
    NoToken(String),
}

impl FakeCoupa {
    /// A code for `client` from the authorize endpoint (the test user
    /// consents), bound to `verifier`'s S256 challenge and `redirect`.
    pub async fn code_by_hand(
        &self,
        client: &str,
        verifier: &str,
        redirect: &str,
    ) -> Result<String, ByHandError> {
        let no_redirects = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let response = no_redirects
            .get(format!("{}/oauth2/authorizations/new", self.base_url()))
            .query(&[
                ("client_id", client),
                ("response_type", "code"),
                ("scope", "core.invoice.read offline_access"),
                ("redirect_uri", redirect),
                ("code_challenge", &super::oauth::s256(verifier)),
                ("code_challenge_method", "S256"),
                ("state", "s1"),
            ])
            .send()
            .await?;
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url::Url::parse(l).ok())
            .ok_or_else(|| ByHandError::NoCode(format!("status {}", response.status())))?;
        let code = location.query_pairs().find(|(k, _)| k == "code");
        code.map(|(_, code)| code.into_owned())
            .ok_or_else(|| ByHandError::NoCode(location.to_string()))
    }

    /// Exchanges `code` for `client`: the status and the JSON answer.
    pub async fn exchange_by_hand(
        &self,
        client: &str,
        code: &str,
        verifier: &str,
        redirect: &str,
    ) -> Result<(u16, serde_json::Value), ByHandError> {
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(format!("{}/oauth2/token", self.base_url()))
            .form(&[
                ("grant_type", "authorization_code"),
                ("client_id", client),
                ("code", code),
                ("redirect_uri", redirect),
                ("code_verifier", verifier),
            ])
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }
    /// An access token for `client` by the client-credentials grant, as
    /// any client of the instance outside the proxy gets one.
    pub async fn client_credentials_by_hand(
        &self,
        client: &str,
        secret: &str,
        scope: &str,
    ) -> Result<String, ByHandError> {
        let answer: serde_json::Value = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(format!("{}/oauth2/token", self.base_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client),
                ("client_secret", secret),
                ("scope", scope),
            ])
            .send()
            .await?
            .json()
            .await?;
        answer["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ByHandError::NoToken(answer.to_string()))
    }
}
