//! The pooled HTTPS client that carries requests to Coupa: keep-alive,
//! HTTP/1.1 or HTTP/2 as ALPN decides, certificate verification always on.

use super::body::UpstreamBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Coupa;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

pub fn build(coupa: &Coupa, tls: rustls::ClientConfig) -> UpstreamClient {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(coupa.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(coupa.pool_idle_timeout)
        .build(connector)
}
