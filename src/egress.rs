//! The corporate egress proxy between this proxy and Coupa
//! (`[coupa.egress_proxy]`): one rule for every hop. With it, every
//! connection to the instance and the token endpoint is a `CONNECT` tunnel
//! through it (TLS to Coupa stays end to end inside); without it, every
//! hop goes direct. The environment's `HTTP_PROXY`, `HTTPS_PROXY`,
//! `ALL_PROXY` and `NO_PROXY` are never honoured: a host whose variables
//! point somewhere would otherwise send the token request one way and the
//! API calls another.
//!
//! Failures name the hop that failed: the egress proxy unreachable, it
//! refusing the `CONNECT` (`403`; `407`: a login wanted or rejected), or
//! Coupa unreachable behind it (its `502`/`504`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::EgressProxy;
use crate::BoxError;

/// Why a tunnel through the egress proxy could not be opened. Never holds
/// the login.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EgressError {
    #[error("the egress proxy {proxy} (coupa.egress_proxy.url) is unreachable: {cause}")]
    Unreachable { proxy: String, cause: String },
    #[error(
        "the egress proxy {proxy} wants a login: set coupa.egress_proxy.username and password_file"
    )]
    LoginRequired { proxy: String },
    #[error("the egress proxy {proxy} rejected the login of coupa.egress_proxy.username: check the user and password_file")]
    LoginRejected { proxy: String },
    #[error("the egress proxy {proxy} refused to open a tunnel to {target} (HTTP {status}): ask its administrators to allow CONNECT to it")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
    },
    #[error("the egress proxy {proxy} could not reach Coupa at {target} (HTTP {status})")]
    CoupaUnreachable {
        proxy: String,
        target: String,
        status: u16,
    },
    #[error("the egress proxy {proxy} broke off the tunnel to {target}: {cause}")]
    Broken {
        proxy: String,
        target: String,
        cause: String,
    },
}

impl EgressError {
    /// The metrics label of this failure.
    pub fn cause(&self) -> &'static str {
        match self {
            EgressError::Unreachable { .. } => "proxy_unreachable",
            EgressError::LoginRequired { .. } => "login_required",
            EgressError::LoginRejected { .. } => "login_rejected",
            EgressError::Refused { .. } => "refused",
            EgressError::CoupaUnreachable { status: 504, .. } => "coupa_timeout",
            EgressError::CoupaUnreachable { .. } => "coupa_unreachable",
            EgressError::Broken { .. } => "broken",
        }
    }

    /// The proxy waited for Coupa and gave up: a gateway timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, EgressError::CoupaUnreachable { status: 504, .. })
    }

    /// The first egress failure along an error's causes.
    pub fn find<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e EgressError> {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(egress) = error.downcast_ref::<EgressError>() {
                return Some(egress);
            }
            cause = error.source();
        }
        None
    }
}

/// Where tunnels go, and the login they carry.
struct Route {
    proxy: Uri,
    /// `http://host:port`, for messages.
    name: String,
    /// `Basic …`, marked sensitive.
    authorization: Option<HeaderValue>,
}

/// A connector that goes direct, or through the egress proxy when one is
/// configured; either way it yields a TCP stream to the destination, which
/// TLS then wraps end to end.
#[derive(Clone)]
pub struct EgressConnector {
    tcp: HttpConnector,
    /// Swapped when a reload brings a new login.
    route: Arc<ArcSwapOption<Route>>,
}

impl EgressConnector {
    pub fn new(tcp: HttpConnector, egress: Option<&EgressProxy>) -> Self {
        Self {
            tcp,
            route: Arc::new(ArcSwapOption::from(egress.map(|e| Arc::new(route(e))))),
        }
    }

    /// New connections go this way from now on; open ones stay.
    pub fn set(&self, egress: Option<&EgressProxy>) {
        self.route.store(egress.map(|e| Arc::new(route(e))));
    }
}

fn route(egress: &EgressProxy) -> Route {
    let authorization = match (&egress.username, &egress.password) {
        (Some(user), Some(password)) => {
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", password.expose()));
            HeaderValue::try_from(format!("Basic {encoded}"))
                .ok()
                .map(|mut value| {
                    value.set_sensitive(true);
                    value
                })
        }
        _ => None,
    };
    Route {
        proxy: Uri::try_from(egress.url.as_str())
            .unwrap_or_else(|_| Uri::from_static("http://invalid")),
        name: egress.url.clone(),
        authorization,
    }
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        match self.route.load_full() {
            None => Box::pin(async move { tcp.call(destination).await.map_err(Into::into) }),
            Some(route) => Box::pin(async move {
                let target = format!(
                    "{}:{}",
                    destination.host().unwrap_or_default(),
                    destination
                        .port_u16()
                        .unwrap_or(crate::encode::default_port(destination.scheme_str()))
                );
                let stream =
                    tcp.call(route.proxy.clone())
                        .await
                        .map_err(|e| EgressError::Unreachable {
                            proxy: route.name.clone(),
                            cause: crate::encode::error_chain(&e),
                        })?;
                Ok(TokioIo::new(
                    tunnel(stream.into_inner(), &route, &target).await?,
                ))
            }),
        }
    }
}

/// Asks the proxy for a tunnel to `target` on `stream`.
async fn tunnel(
    mut stream: TcpStream,
    route: &Route,
    target: &str,
) -> Result<TcpStream, EgressError> {
    let broken = |cause: String| EgressError::Broken {
        proxy: route.name.clone(),
        target: target.to_owned(),
        cause,
    };
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(authorization) = &route.authorization {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(authorization.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream
        .write_all(&head)
        .await
        .map_err(|e| broken(e.to_string()))?;
    // Read the answer's head byte by byte: nothing of the tunnel's own
    // bytes (Coupa's TLS) may be taken from the stream.
    let mut answer = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() > 16 * 1024 {
            return Err(broken("an answer head over 16 KiB".into()));
        }
        match stream.read(&mut byte).await {
            Ok(0) => return Err(broken("it closed the connection before answering".into())),
            Ok(_) => answer.push(byte[0]),
            Err(e) => return Err(broken(e.to_string())),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let status = match response.parse(&answer) {
        Ok(httparse::Status::Complete(_)) => response.code.unwrap_or(0),
        _ => return Err(broken("its answer is not HTTP".into())),
    };
    let proxy = route.name.clone();
    match status {
        200..=299 => Ok(stream),
        // 407 is the standard answer; some proxies (tinyproxy) answer a
        // wrong login with 401.
        401 | 407 if route.authorization.is_some() => Err(EgressError::LoginRejected { proxy }),
        401 | 407 => Err(EgressError::LoginRequired { proxy }),
        500..=599 => Err(EgressError::CoupaUnreachable {
            proxy,
            target: target.to_owned(),
            status,
        }),
        status => Err(EgressError::Refused {
            proxy,
            target: target.to_owned(),
            status,
        }),
    }
}

/// Opens one tunnel to `url`'s host and closes it: what the egress proxy
/// says when another client (the token requests') only reports that the
/// tunnel failed.
pub async fn diagnose(egress: &EgressProxy, url: &str) -> Option<EgressError> {
    let destination: Uri = url.parse().ok()?;
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let mut connector = EgressConnector::new(tcp, Some(egress));
    let opened = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        connector.call(destination),
    )
    .await
    .ok()?;
    opened
        .err()
        .and_then(|error| EgressError::find(&*error).cloned())
}

/// A `reqwest` client builder that follows the one rule: the egress proxy
/// when configured, else direct, and never the environment's variables.
pub fn reqwest_builder(egress: Option<&EgressProxy>) -> reqwest::ClientBuilder {
    let egress = egress.cloned();
    reqwest_builder_with(egress.is_some(), move || egress.clone())
}

/// [`reqwest_builder`] with the egress proxy read at each new connection
/// (`current`), so a reloaded password applies without a new client.
pub fn reqwest_builder_with(
    configured: bool,
    current: impl Fn() -> Option<EgressProxy> + Send + Sync + 'static,
) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder().no_proxy();
    if !configured {
        return builder;
    }
    builder.proxy(reqwest::Proxy::custom(move |_| {
        let egress = current()?;
        let mut url = url::Url::parse(&egress.url).ok()?;
        if let (Some(user), Some(password)) = (&egress.username, &egress.password) {
            url.set_username(user).ok()?;
            url.set_password(Some(password.expose())).ok()?;
        }
        Some(url)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_answer_of_the_proxy_names_its_cause_and_no_login() {
        let egress = EgressProxy {
            url: "http://127.0.0.1:1".into(),
            host: "127.0.0.1".into(),
            port: 1,
            username: Some("svc".into()),
            password: Some(crate::secret::Secret::new("pa55-word")),
            password_file: None,
        };
        let route = route(&egress);
        for (answer, cause) in [
            ("HTTP/1.1 200 Connection established\r\n\r\n", None),
            (
                "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                Some("login_rejected"),
            ),
            ("HTTP/1.1 403 Forbidden\r\n\r\n", Some("refused")),
            (
                "HTTP/1.1 502 Bad Gateway\r\n\r\n",
                Some("coupa_unreachable"),
            ),
            (
                "HTTP/1.1 504 Gateway Timeout\r\n\r\n",
                Some("coupa_timeout"),
            ),
            ("garbage\r\n\r\n", Some("broken")),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut head = vec![0u8; 1024];
                let n = socket.read(&mut head).await.unwrap();
                socket.write_all(answer.as_bytes()).await.unwrap();
                String::from_utf8_lossy(&head[..n]).into_owned()
            });
            let stream = TcpStream::connect(addr).await.unwrap();
            let result = tunnel(stream, &route, "acme.coupahost.com:443").await;
            let sent = server.await.unwrap();
            assert!(sent.starts_with("CONNECT acme.coupahost.com:443 HTTP/1.1\r\n"));
            assert!(sent.contains("Proxy-Authorization: Basic "), "{sent}");
            match (result, cause) {
                (Ok(_), None) => {}
                (Err(error), Some(cause)) => {
                    assert_eq!(error.cause(), cause);
                    let text = error.to_string();
                    assert!(text.contains("egress proxy"), "{text}");
                    assert!(
                        !text.contains("pa55-word") && !text.contains("c3Zj"),
                        "{text}"
                    );
                }
                (other, _) => panic!("{answer:?}: {other:?}"),
            }
        }
    }
}
