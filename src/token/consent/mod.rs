//! A user's consent (authorization code with PKCE, device code) and the
//! tokens it yields.
//!
//! - [`authorize`]: the `authorize` subcommand, the one-time interactive
//!   consent; [`pkce`] makes its one-time values.
//! - [`state_file`]: the consent on disk (refresh token, access token,
//!   expiries), written atomically.
//! - [`shared`]: the same state in Redis, sealed, for several processes
//!   (`[cluster]`).
//! - [`grant`]: the token source that serves and renews a consent.

pub mod authorize;
pub mod grant;
pub mod pkce;
pub mod shared;
pub mod state_file;

pub use grant::{authorize_command, ConsentError, UserGrantSource};
pub use shared::{ConsentStateError, SharedConsent};
