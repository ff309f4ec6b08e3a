//! A `CONNECT` tunnel to the instance (`[listen.intercept]`), handled
//! before hyper sees the connection so it runs in the connection's own
//! task: the same connection slot, timeouts, write pace and drain as any
//! other connection. The `CONNECT` head is read (bounded by
//! `max_header_bytes` and the header-read timeout); a target other than
//! the instance gets `403` and nothing is opened; the instance gets `200`,
//! then TLS with the leaf minted for it, then the same HTTP/1.1 or HTTP/2
//! service as a direct connection.

use bytes::Bytes;
use hyper_util::server::graceful::Watcher;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::framing::ConnectionGuard;
use super::negotiated::{serve_negotiated, Rewind};
use super::{BoxError, ConnectionService, Listener, ResponseBody};
use crate::intercept::Refusal;

/// Serves one connection that starts with `CONNECT`.
pub(super) async fn serve_connect<IO, S, B>(
    mut io: IO,
    listener: &Listener,
    watcher: Watcher,
    verdicts: Arc<ConnectionGuard>,
    service: S,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let Some(intercept) = &listener.intercept else {
        return Err("CONNECT without [listen.intercept]".into());
    };
    let timeout = listener.first_byte_timeout;
    let head = tokio::time::timeout(timeout, read_head(&mut io, listener.max_head))
        .await
        .map_err(|_| super::HeadTimeout("CONNECT head not complete"))?;
    let (target, rest) = match head {
        Ok(head) => head,
        Err(why) => {
            answer(&mut io, 400, "bad_connect", &why).await;
            return Err(why.into());
        }
    };
    if let Err(refusal) = intercept.check(&target) {
        static REFUSED: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
        if let Some(left_out) = REFUSED.due() {
            warn!(%refusal, left_out, "CONNECT refused; nothing opened");
        }
        let status = match refusal {
            Refusal::OtherTarget { .. } => 403,
            Refusal::Malformed(_) => 400,
        };
        answer(&mut io, status, "tunnel_refused", &refusal.to_string()).await;
        return Ok(());
    }
    io.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    let tls = tokio::time::timeout(
        timeout,
        intercept.acceptor().accept(Rewind::new(rest, io)),
    )
    .await
    .map_err(|_| super::HeadTimeout("TLS handshake in the CONNECT tunnel not completed"))?
    .map_err(|error| {
        warn!(
            %error,
            "TLS handshake in a CONNECT tunnel failed (does the client trust listen.intercept.ca_cert_file?)"
        );
        error
    })?;
    debug!(instance = %intercept.instance(), "CONNECT tunnel open");
    serve_negotiated(tls, Bytes::new(), listener, watcher, verdicts, service).await
}

/// Reads a `CONNECT` request head: its target, and any bytes after it.
async fn read_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
    max_head: usize,
) -> Result<(String, Bytes), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the CONNECT head: {e}"))?;
        if n == 0 {
            return Err("connection closed in the CONNECT head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(end)) => {
                if request.method != Some("CONNECT") {
                    return Err("not a CONNECT request".into());
                }
                let target = request.path.unwrap_or("").to_owned();
                return Ok((target, Bytes::copy_from_slice(&buf[end..])));
            }
            Ok(httparse::Status::Partial) if buf.len() <= max_head => continue,
            Ok(httparse::Status::Partial) => {
                return Err("CONNECT head larger than listen.max_header_bytes".into())
            }
            Err(e) => return Err(format!("malformed CONNECT head: {e}")),
        }
    }
}

/// A JSON error answer, then the end of the connection.
async fn answer<IO: AsyncWrite + Unpin>(io: &mut IO, status: u16, error: &str, message: &str) {
    let reason = match status {
        403 => "Forbidden",
        _ => "Bad Request",
    };
    let body = crate::encode::error_json(error, message);
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}
