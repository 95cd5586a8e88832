//! A TCP proxy between agentwire nodes and Redis that breaks the link on demand.
//!
//! The failure table of docs/scale-out.md promises what users see when the link to Redis is slow,
//! silently dead or cut. Stopping Redis shows none of these: it refuses connections at once and
//! takes subscriptions and commands down together. So the tests point the nodes at this proxy and
//! fault its connections instead, per connection and per class: a connection is a Pub/Sub one once
//! its client has sent SUBSCRIBE (agentwire subscribes on a connection of its own), so a lost
//! subscription can be tested while commands still work, and the other way round.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What happens to the bytes of a connection, decided again for every chunk read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    Pass,
    /// Every chunk is forwarded this much after it was read, in order: a slow link.
    Delay(Duration),
    /// Bytes vanish both ways while both sockets stay open: a half-open link that no RST reveals,
    /// found only by the client's own timeouts.
    Blackhole,
    /// Both sockets close, and connections accepted meanwhile are closed at once (a new connection
    /// is a command one until it subscribes).
    Cut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    All,
    PubSub,
    Commands,
}

const PUBSUB: usize = 0;
const COMMANDS: usize = 1;

impl Which {
    fn classes(self) -> &'static [usize] {
        match self {
            Which::All => &[PUBSUB, COMMANDS],
            Which::PubSub => &[PUBSUB],
            Which::Commands => &[COMMANDS],
        }
    }
}

/// The fault of each class, and how many times each was cut: a connection compares that count with
/// the one it started with, so that a Cut undone before its task woke up still closes it.
#[derive(Clone, Copy, Default)]
struct Modes {
    faults: [Fault; 2],
    cuts: [u64; 2],
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    open: [AtomicUsize; 2],
}

type Chunk = (Option<Instant>, Vec<u8>);

pub struct FaultProxy {
    addr: SocketAddr,
    /// Every connection waits on it: dropping it (with the proxy) ends them all.
    modes: watch::Sender<Modes>,
    counts: Arc<Counts>,
    /// A runtime of its own: the proxy must forward while the test's thread is blocked (a
    /// server's start-up check connects through it while the test waits for the server).
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (modes, receiver) = watch::channel(Modes::default());
        let counts = Arc::new(Counts::default());
        let accepting = counts.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            accept_loop(listener, upstream, receiver, accepting).await
        });
        FaultProxy { addr, modes, counts, runtime: Some(runtime) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Applies `fault` to the open connections of `which` and to those yet to come.
    pub fn set(&self, which: Which, fault: Fault) {
        log::info!("fault proxy {}: {which:?} {fault:?}", self.addr);
        self.modes.send_modify(|modes| {
            for &class in which.classes() {
                modes.faults[class] = fault;
                if fault == Fault::Cut {
                    modes.cuts[class] += 1;
                }
            }
        });
    }

    /// The open (Pub/Sub, command) connections.
    pub fn connections(&self) -> (usize, usize) {
        (self.counts.open[PUBSUB].load(SeqCst), self.counts.open[COMMANDS].load(SeqCst))
    }

    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    modes: watch::Receiver<Modes>,
    counts: Arc<Counts>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: wait rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        counts.accepted.fetch_add(1, SeqCst);
        let now = *modes.borrow();
        // Every new connection is a command one: dropped here while commands are cut.
        if now.faults[COMMANDS] == Fault::Cut {
            continue;
        }
        tokio::spawn(serve(client, upstream, modes.clone(), counts.clone(), now.cuts[COMMANDS]));
    }
}

/// One open link as `connections()` counts it, uncounted however its task ends.
struct Conn {
    counts: Arc<Counts>,
    pubsub: AtomicBool,
    /// The cut count of its class when it joined that class.
    cuts_seen: AtomicU64,
}

impl Conn {
    fn class(&self) -> usize {
        if self.pubsub.load(SeqCst) {
            PUBSUB
        } else {
            COMMANDS
        }
    }

    fn become_pubsub(&self, modes: &Modes) {
        if !self.pubsub.swap(true, SeqCst) {
            // Cuts of commands before now no longer concern it.
            self.cuts_seen.store(modes.cuts[PUBSUB], SeqCst);
            self.counts.open[PUBSUB].fetch_add(1, SeqCst);
            self.counts.open[COMMANDS].fetch_sub(1, SeqCst);
        }
    }

    fn fault(&self, modes: &Modes) -> Fault {
        let class = self.class();
        if modes.cuts[class] != self.cuts_seen.load(SeqCst) {
            Fault::Cut
        } else {
            modes.faults[class]
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.counts.open[self.class()].fetch_sub(1, SeqCst);
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    modes: watch::Receiver<Modes>,
    counts: Arc<Counts>,
    cuts_seen: u64,
) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    counts.open[COMMANDS].fetch_add(1, SeqCst);
    let conn = Conn { counts, pubsub: AtomicBool::new(false), cuts_seen: AtomicU64::new(cuts_seen) };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut watcher = modes.clone();
    // The first to end ends the link: the others are dropped with their sockets. The watcher is
    // there because a Cut must close an idle link too; its error is the proxy dropped.
    tokio::select! {
        () = pump(client_read, server_write, &conn, &modes, true) => {}
        () = pump(server_read, client_write, &conn, &modes, false) => {}
        _ = watcher.wait_for(|now| conn.fault(now) == Fault::Cut) => {}
    }
}

/// One direction, until its reader ends (once what it queued is written) or its writer fails.
async fn pump(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    conn: &Conn,
    modes: &watch::Receiver<Modes>,
    from_client: bool,
) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let writer = write_out(receiver, to);
    tokio::pin!(writer);
    tokio::select! {
        drain = read_in(from, sender, conn, modes, from_client) => {
            if drain {
                writer.await;
            }
        }
        () = &mut writer => {}
    }
}

/// Queues what it reads as the connection's fault says. True at the end of the stream, false when
/// the link must end at once. Taking `sender` by value closes the queue when it returns.
async fn read_in(
    mut from: OwnedReadHalf,
    sender: mpsc::UnboundedSender<Chunk>,
    conn: &Conn,
    modes: &watch::Receiver<Modes>,
    from_client: bool,
) -> bool {
    let mut buf = vec![0; 16 * 1024];
    let mut tail = Vec::new();
    loop {
        // An end or a reset from this side still delivers what was read before it: those bytes
        // were on the network already (a client that gives up on a delayed command does not
        // take it back from Redis).
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let now = *modes.borrow();
        if from_client && conn.class() == COMMANDS && names_subscribe(&mut tail, chunk) {
            conn.become_pubsub(&now);
        }
        let at = match conn.fault(&now) {
            Fault::Pass => None,
            Fault::Delay(delay) => Some(Instant::now() + delay),
            Fault::Blackhole => continue,
            Fault::Cut => return false,
        };
        if sender.send((at, chunk.to_vec())).is_err() {
            return false;
        }
    }
}

/// One writer per direction, sleeping before each chunk, so a delay never reorders bytes.
async fn write_out(mut receiver: mpsc::UnboundedReceiver<Chunk>, mut to: OwnedWriteHalf) {
    while let Some((at, chunk)) = receiver.recv().await {
        if let Some(at) = at {
            tokio::time::sleep_until(at).await;
        }
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Whether the client's bytes name SUBSCRIBE (SSUBSCRIBE and PSUBSCRIBE contain it). `tail` keeps
/// the end of the bytes before, so that a name split between two reads is still found.
fn names_subscribe(tail: &mut Vec<u8>, chunk: &[u8]) -> bool {
    const NAME: &[u8] = b"SUBSCRIBE";
    tail.extend_from_slice(chunk);
    let found = tail.windows(NAME.len()).any(|w| w.eq_ignore_ascii_case(NAME));
    tail.drain(..tail.len().saturating_sub(NAME.len() - 1));
    found
}
