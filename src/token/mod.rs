//! OAuth access tokens: how they are fetched, stored and rotated.
//!
//! - [`client`]: one request to the token endpoint, with RFC 6749 errors
//!   turned into advice a user can act on.
//! - [`store`]: the current token, read lock-free by every request.
//! - [`refresher`]: the background task that keeps the store filled.
//! - [`source`]: which source a credential's grant uses; [`user_grant`]
//!   renews consented grants with their refresh token, kept in a
//!   [`state_file`]; [`pkce`] makes the one-time values of a consent.
//!
//! The request path only ever touches [`TokenStore::bearer`]; everything
//! else here runs in the background.

pub mod client;
pub mod pkce;
pub mod refresher;
pub mod source;
pub mod state_file;
pub mod store;
pub mod user_grant;

pub use client::{FetchError, FetchedToken, TokenClient, TokenRequest};
pub use refresher::{RefreshPolicy, Refresher};
pub use source::CredentialSource;
pub use store::{ActiveToken, AfterRejection, RefreshTokenInfo, TokenStatus, TokenStore};

/// The grant type of RFC 8628 (device authorization).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
