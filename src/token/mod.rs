//! OAuth access tokens: how they are fetched, stored and rotated.
//!
//! - [`client`]: one request to the token endpoint, with RFC 6749 errors
//!   turned into advice a user can act on.
//! - [`store`]: the current token, read lock-free by every request.
//! - [`refresher`]: the background task that keeps the store filled.
//! - [`source`]: which source a credential's grant uses: the token client,
//!   the [`shared`] fetch across processes (`[cluster]`), or a user's
//!   [`consent`] renewed with its refresh token.
//!
//! The request path only ever touches [`TokenStore::bearer`]; everything
//! else here runs in the background.

pub mod client;
pub mod consent;
pub mod refresher;
pub mod shared;
pub mod source;
pub mod store;

pub use client::{FetchError, FetchedToken, TokenClient, TokenRequest};
pub use refresher::{RefreshPolicy, Refresher};
pub use source::CredentialSource;
pub use store::{ActiveToken, AfterRejection, RefreshTokenInfo, TokenStatus, TokenStore};

/// The grant type of RFC 8628 (device authorization).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
