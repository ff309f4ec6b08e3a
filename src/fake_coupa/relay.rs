//! A link with a real round trip, for the load bench (the kernel here has
//! no netem): a TCP relay that forwards each chunk `delay` after it
//! arrived, each way, and opens each connection one round trip late, as a
//! distant server's TCP handshake would. Test tooling, like the fake.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// The relay; stops when dropped.
pub struct DelayRelay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl DelayRelay {
    /// Listens on a free loopback port and relays every connection to
    /// `target` with `delay` each way.
    pub async fn start(target: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target, delay));
            }
        });
        Ok(Self { port, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, delay: Duration) {
    // The kernel completes the handshake with the relay at once; a
    // distant server's takes a round trip, before which the client's first
    // bytes cannot leave.
    tokio::time::sleep(delay * 2).await;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        delayed(client_read, server_write, delay),
        delayed(server_read, client_write, delay)
    );
}

/// Copies `from` to `to`, each chunk written `delay` after it was read;
/// order kept, reading never waits for the delay (a link, not a stall).
async fn delayed(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (queue, mut due) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let at = tokio::time::Instant::now() + delay;
                    if queue.send((at, buffer[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// An echo server: what it reads, it writes back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Real time, and only lower bounds: a delay can come out longer on a
    /// loaded machine, never shorter. (Paused time does not mix with real
    /// sockets: its clock may jump while a segment is still in the kernel.)
    #[tokio::test]
    async fn each_way_is_delayed_and_a_connection_opens_a_round_trip_late() {
        let delay = Duration::from_millis(20);
        let relay = DelayRelay::start(echo().await, delay).await.unwrap();
        let mut stream = TcpStream::connect(("127.0.0.1", relay.port()))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let sent = Instant::now();
        stream.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");
        // Handshake (2 × delay) + there (delay) + back (delay).
        assert!(sent.elapsed() >= delay * 4, "{:?}", sent.elapsed());

        // On the open connection: one round trip, and order kept.
        let sent = Instant::now();
        stream.write_all(b"one, two").await.unwrap();
        let mut answer = [0u8; 8];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"one, two");
        assert!(sent.elapsed() >= delay * 2, "{:?}", sent.elapsed());
    }
}
