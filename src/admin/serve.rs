//! The admin server's connections, bounded, because its port is open to
//! probes and to whoever can reach it: a client that connects and sends
//! nothing, trickles its headers or stops reading a download must not hold
//! the daemon's file descriptors, memory or threads. Every connection must
//! send its request head within [`HEAD_TIMEOUT`] (also between requests on a
//! kept-alive connection), a connection whose reads and writes make no
//! progress for [`STALL_TIMEOUT`] is closed, request heads are held to
//! [`MAX_HEAD`], and at most [`MAX_CONNECTIONS`] are served at once (one
//! more is closed as soon as it is accepted), at most [`MAX_PER_PEER`] of
//! them from one address, so that one host holding connections open cannot
//! lock the probes, Prometheus and the operators' control calls out.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_PER_PEER: usize = MAX_CONNECTIONS / 4;
/// hyper's read buffer, which bounds a request head (a longer one gets 431;
/// hyper reads ahead, so the bound seen is up to about twice this).
pub const MAX_HEAD: usize = 64 * 1024;

/// Serves `app` on `listener` until `stop` turns true; connections under
/// way are then asked to finish their request and close.
pub async fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    serve_with(listener, app, &mut stop, Limits::default()).await
}

#[derive(Clone, Copy)]
struct Limits {
    head: Duration,
    stall: Duration,
    connections: usize,
    per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            head: HEAD_TIMEOUT,
            stall: STALL_TIMEOUT,
            connections: MAX_CONNECTIONS,
            per_peer: MAX_PER_PEER,
        }
    }
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    stop: &mut watch::Receiver<bool>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let peers = Arc::new(std::sync::Mutex::new(HashMap::new()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok((tcp, peer)) => (tcp, peer.ip()),
            Err(e) => {
                // Out of file descriptors or the like: let it ease rather than spin.
                crate::telemetry::events::AdminServerFailed { error: &e }.emit();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(peer_slot) = PeerSlot::take(&peers, peer, limits.per_peer) else {
            drop(tcp);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |request: hyper::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ClientAddr(peer));
                request
            },
        ));
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let io = TokioIo::new(Stalling::new(tcp, limits.stall));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head)
                .max_buf_size(MAX_HEAD);
            let connection = builder.serve_connection(io, service).with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let stopping = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopping => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.stall, connection).await;
                }
            }
            drop(slot);
            drop(peer_slot);
        });
    }
}

/// The address a request came from, for log lines about refused callers.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// One of a peer address's connections, counted while it lives.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerSlot {
    fn take(
        peers: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
        peer: IpAddr,
        limit: usize,
    ) -> Option<Self> {
        let mut counts = peers.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(peer).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Self {
            peers: peers.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// A TCP stream that fails a read or write once neither has made progress
/// for `limit` while one of them waits.
struct Stalling {
    tcp: TcpStream,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Stalling {
    fn new(tcp: TcpStream, limit: Duration) -> Self {
        Self {
            tcp,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }

    fn progressed(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.limit);
    }

    /// A waiting operation's result: an error once the deadline passed.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin connection made no progress",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Stalling {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Pending => this.waiting(cx),
            ready => {
                this.progressed();
                ready
            }
        }
    }
}

impl AsyncWrite for Stalling {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write(cx, data) {
            Poll::Pending => this.waiting(cx),
            ready => {
                this.progressed();
                ready
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use axum::routing::get;

    use super::*;

    async fn start(limits: Limits, app: Router) -> (String, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop_tx, mut stop) = watch::channel(false);
        tokio::spawn(async move { serve_with(listener, app, &mut stop, limits).await });
        (address, stop_tx)
    }

    fn hello() -> Router {
        Router::new().route("/healthz", get(|| async { "ok\n" }))
    }

    /// Whether the server closed the connection: a read that ends (0 bytes
    /// or a reset) within `within`, rather than timing out.
    fn closed_within(tcp: &mut std::net::TcpStream, within: Duration) -> bool {
        tcp.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    /// A connection that sends nothing, or half a request head, is closed
    /// at the head deadline; a whole request is served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_or_trickling_client_is_closed_at_the_head_deadline() {
        let limits = Limits {
            head: Duration::from_millis(300),
            ..Limits::default()
        };
        let (address, _stop) = start(limits, hello()).await;
        let address2 = address.clone();
        tokio::task::spawn_blocking(move || {
            let mut silent = std::net::TcpStream::connect(&address2).unwrap();
            assert!(closed_within(&mut silent, Duration::from_secs(5)), "silent");
            let mut half = std::net::TcpStream::connect(&address2).unwrap();
            half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            assert!(
                closed_within(&mut half, Duration::from_secs(5)),
                "half a head"
            );
            let mut whole = std::net::TcpStream::connect(&address2).unwrap();
            whole
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            whole.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        })
        .await
        .unwrap();
    }

    /// Waits until a slot is free again (the server notices closes
    /// promptly, but not at once): a request is served within 5 s.
    fn served_again(address: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = std::net::TcpStream::connect(address).unwrap();
            again
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            let _ = again.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no slot came free");
        }
    }

    /// Connections past the limit are closed at once; the slot of one that
    /// ends is free again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_limit_are_closed_at_once() {
        let limits = Limits {
            connections: 2,
            ..Limits::default()
        };
        let (address, _stop) = start(limits, hello()).await;
        tokio::task::spawn_blocking(move || {
            let mut first = std::net::TcpStream::connect(&address).unwrap();
            let mut second = std::net::TcpStream::connect(&address).unwrap();
            let mut third = std::net::TcpStream::connect(&address).unwrap();
            assert!(closed_within(&mut third, Duration::from_secs(5)), "third");
            assert!(
                !closed_within(&mut first, Duration::from_millis(200)),
                "first"
            );
            drop(first);
            second
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            second.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            // Both slots are free again (the server notices the closes promptly).
            served_again(&address);
        })
        .await
        .unwrap();
    }

    /// One address holding its share of connections open is refused more,
    /// while another address is still served: a flood from one host does
    /// not lock the probes and the operators out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_address_cannot_take_every_connection() {
        let limits = Limits {
            connections: 8,
            per_peer: 3,
            ..Limits::default()
        };
        let (address, _stop) = start(limits, hello()).await;
        let server: std::net::SocketAddr = address.parse().unwrap();
        // Linux routes all of 127/8 to the loopback: a second host, locally.
        let from = |ip: &str| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            async move { socket.connect(server).await.unwrap().into_std().unwrap() }
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(from("127.0.0.1").await);
        }
        let mut fourth = from("127.0.0.1").await;
        let mut other = from("127.0.0.2").await;
        tokio::task::spawn_blocking(move || {
            fourth.set_nonblocking(false).unwrap();
            other.set_nonblocking(false).unwrap();
            assert!(
                closed_within(&mut fourth, Duration::from_secs(5)),
                "a fourth from one address"
            );
            other
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            other.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            // Its slots come back as its connections close.
            drop(held);
            served_again(&server.to_string());
        })
        .await
        .unwrap();
    }

    /// A client that stops reading a long answer is dropped once the
    /// answer has not moved for the stall limit, which ends the answer's
    /// producer (here: a stream that would never end).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_is_dropped_and_its_answer_ends() {
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
        let ended_tx = Arc::new(std::sync::Mutex::new(Some(ended_tx)));
        let app = Router::new().route(
            "/big",
            get(move || {
                let ended_tx = ended_tx.clone();
                async move {
                    /// Tells the test when the answer is dropped.
                    struct Ended(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);
                    impl Drop for Ended {
                        fn drop(&mut self) {
                            if let Some(tx) = self.0.lock().unwrap().take() {
                                let _ = tx.send(());
                            }
                        }
                    }
                    let ended = Ended(ended_tx);
                    let chunks = futures::stream::repeat_with(move || {
                        let _ = &ended;
                        Ok::<_, io::Error>(axum::body::Bytes::from(vec![b'x'; 64 << 10]))
                    });
                    axum::body::Body::from_stream(chunks)
                }
            }),
        );
        let limits = Limits {
            stall: Duration::from_millis(500),
            ..Limits::default()
        };
        let (address, _stop) = start(limits, app).await;
        let client = std::net::TcpStream::connect(&address).unwrap();
        (&client)
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // The client reads nothing; the answer must be dropped all the same.
        tokio::time::timeout(Duration::from_secs(10), ended_rx)
            .await
            .expect("the stalled answer was dropped")
            .unwrap();
        drop(client);
    }
}
