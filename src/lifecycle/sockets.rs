//! Listening sockets handed over by a supervisor (systemd's socket
//! activation) or by the previous process on an in-place upgrade, in
//! systemd's protocol: `LISTEN_FDS` sockets from fd 3, `LISTEN_PID` the
//! process they are for (empty on an upgrade, where the parent cannot know
//! the child's pid), `LISTEN_FDNAMES` their names.

use std::net::TcpListener;

/// The name of the proxy listener's socket (`FileDescriptorName=`).
pub const PROXY: &str = "proxy";
/// The name of the admin listener's socket.
pub const ADMIN: &str = "admin";

/// Sockets handed to this process; a listener without one binds its
/// configured address.
#[derive(Debug, Default)]
pub struct Inherited {
    pub proxy: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("LISTEN_FDNAMES names a socket {0:?} the proxy does not know: name the socket units' FileDescriptorName= \"proxy\" (listen.address) or \"admin\" (admin.address)")]
    UnknownName(String),
    #[error("more than one socket handed over for the {0} listener (LISTEN_FDNAMES)")]
    Twice(&'static str),
    #[error("LISTEN_FDS hands over {0} sockets; the proxy listens on two at most (proxy, admin)")]
    TooMany(usize),
    #[error(
        "the socket handed over for the {name} listener is not a listening TCP socket: {error}"
    )]
    NotTcp {
        name: &'static str,
        error: std::io::Error,
    },
}

/// Takes the sockets the environment hands over, and clears the variables
/// so nothing this process starts inherits them by mistake. Call before
/// any thread starts (it changes the environment).
pub fn take_from_env() -> Result<Inherited, SocketsError> {
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let mut handed = listenfd::ListenFd::from_env();
    if handed.len() == 0 {
        return Ok(Inherited::default());
    }
    std::env::remove_var("LISTEN_FDNAMES");
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let roles = roles(handed.len(), &names)?;
    let mut inherited = Inherited::default();
    for (index, role) in roles.into_iter().enumerate() {
        let listener = handed
            .take_tcp_listener(index)
            .and_then(|l| l.ok_or_else(|| std::io::Error::other("already taken")))
            .map_err(|error| SocketsError::NotTcp { name: role, error })?;
        let slot = if role == PROXY {
            &mut inherited.proxy
        } else {
            &mut inherited.admin
        };
        *slot = Some(listener);
    }
    Ok(inherited)
}

/// Which listener each of `count` sockets is for: by name, or, unnamed
/// (no name, systemd's `unknown`), in order: proxy, then admin.
fn roles(count: usize, names: &[String]) -> Result<Vec<&'static str>, SocketsError> {
    if count > 2 {
        return Err(SocketsError::TooMany(count));
    }
    let mut roles = Vec::with_capacity(count);
    for index in 0..count {
        let role = match names.get(index).map(String::as_str) {
            Some(PROXY) => PROXY,
            Some(ADMIN) => ADMIN,
            None | Some("") | Some("unknown") => {
                if roles.contains(&PROXY) {
                    ADMIN
                } else {
                    PROXY
                }
            }
            Some(other) => return Err(SocketsError::UnknownName(other.to_owned())),
        };
        if roles.contains(&role) {
            return Err(SocketsError::Twice(role));
        }
        roles.push(role);
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn named_sockets_go_to_their_listener_in_any_order() {
        assert_eq!(
            roles(2, &names(&["admin", "proxy"])).unwrap(),
            [ADMIN, PROXY]
        );
        assert_eq!(roles(1, &names(&["admin"])).unwrap(), [ADMIN]);
    }

    #[test]
    fn unnamed_sockets_are_proxy_then_admin() {
        assert_eq!(roles(2, &[]).unwrap(), [PROXY, ADMIN]);
        assert_eq!(roles(1, &names(&["unknown"])).unwrap(), [PROXY]);
        assert_eq!(
            roles(2, &names(&["proxy", "unknown"])).unwrap(),
            [PROXY, ADMIN]
        );
    }

    #[test]
    fn unknown_names_and_surplus_sockets_are_refused_with_the_fix() {
        let error = roles(1, &names(&["metrics"])).unwrap_err().to_string();
        assert!(
            error.contains("\"metrics\"") && error.contains("FileDescriptorName"),
            "{error}"
        );
        assert!(matches!(roles(3, &[]), Err(SocketsError::TooMany(3))));
        assert!(matches!(
            roles(2, &names(&["proxy", "proxy"])),
            Err(SocketsError::Twice(PROXY))
        ));
    }
}
