//! OAuth access tokens: how they are fetched, stored and rotated.
//!
//! - [`client`]: one request to the token endpoint, with RFC 6749 errors
//!   turned into advice a user can act on.
//! - [`store`]: the current token, read lock-free by every request.
//! - [`refresher`]: the background task that keeps the store filled.
//!
//! The request path only ever touches [`TokenStore::bearer`]; everything
//! else here runs in the background.

pub mod client;
pub mod refresher;
pub mod store;

pub use client::{FetchError, FetchedToken, TokenClient};
pub use refresher::{RefreshPolicy, Refresher};
pub use store::{ActiveToken, AfterRejection, TokenStatus, TokenStore};
