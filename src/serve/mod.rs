//! `qmprestore serve`: every point in time of a backup directory as an NBD export, read
//! straight from the backup files (no merge first), every block checked against its file's
//! manifest. Tokio listens, haggles and handles signals; once a client enters the
//! transmission phase, its requests are answered on worker threads of its own.
//!
//! - `catalog`: the points and how they are opened;
//! - `handshake`: the fixed-newstyle option haggling;
//! - `transmission`: requests and replies (the worker threads);
//! - `reads`: what a read or a block status resolves to in a chain;
//! - `proto`: the wire format.

pub mod catalog;
pub mod handshake;
pub mod proto;
pub mod reads;
pub mod transmission;

use crate::fsutil::Dir;
use crate::report;
use crate::restore::options::CheckOptions;
use crate::store::lock::{DirLock, LockMode};
use anyhow::{bail, Context, Result};
use catalog::Catalog;
use handshake::{greet, Negotiation, Outcome, Session};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use transmission::{Shared, Socket};

/// What `qmprestore serve` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// The disk's backup directory (e.g. /backup/vm1/disk1).
    #[arg(long)]
    pub dir: PathBuf,
    /// Use only files whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
    /// The point the default export (empty name) serves: a file name, the name without
    /// extension, or INC-<time>. Default: the newest point.
    #[arg(long)]
    pub until: Option<String>,
    /// Listen on this unix socket (created; removed at exit).
    #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on HOST:PORT over TCP. 0.0.0.0 or [::] exposes the backups to the network.
    #[arg(long)]
    pub listen: Option<String>,
    /// At most this many clients at once; more are turned away.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
}

/// How long a client may take over the handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Replies held in memory at once, all connections together.
const REPLY_BUDGET: u64 = 256 << 20;
/// After SIGINT/SIGTERM: how long requests in flight get to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the server until SIGINT or SIGTERM.
pub fn serve(opts: &ServeOptions, checks: CheckOptions) -> Result<()> {
    if opts.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    // Held while serving: a backup may add points meanwhile, nothing may rewrite them.
    let dir = Dir::open(&opts.dir)
        .with_context(|| format!("{}: cannot read the backup directory", opts.dir.display()))?;
    let _lock = DirLock::acquire(&dir, LockMode::Shared)?;
    let catalog = Catalog::scan(
        &opts.dir,
        opts.filter.as_deref(),
        opts.until.as_deref(),
        checks,
    )?;
    // The default export is opened (and checked) now: a damaged chain is an error at
    // start-up, not at the first client.
    let default = &catalog.points[catalog.default];
    catalog.open(default).map_err(|m| anyhow::anyhow!("{m}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(run(opts, Arc::new(catalog)))
}

enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

async fn run(opts: &ServeOptions, catalog: Arc<Catalog>) -> Result<()> {
    let (listener, uri) = bind(opts).await?;
    let default = &catalog.points[catalog.default];
    report::info(format!(
        "serving {} point(s) of {}; the default export is {} ({})",
        catalog.points.len(),
        opts.dir.display(),
        default.file.name,
        default.description
    ));
    // What to connect to, on stdout: the default export, and how to list the others.
    println!("{uri}");
    report::info(format!(
        "connect to {uri} (list the exports: nbdinfo --list '{uri}'); stop with SIGINT or SIGTERM"
    ));
    let shared = Arc::new(Shared::new(REPLY_BUDGET));
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let accepted: std::io::Result<Conn> = tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                report::warn(format!("accepting a connection failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            report::warn(format!(
                "a client was turned away: {} connections already (--max-connections)",
                opts.max_connections
            ));
            continue;
        };
        let (catalog, shared, stop) = (catalog.clone(), shared.clone(), stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = connection(stream, &catalog, shared, stop).await {
                report::debug(format!("connection ended: {e}"));
            }
            drop(slot);
        });
    }
    report::info("stopping: no new connections; answering the requests in flight");
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        report::warn(format!(
            "{} connection(s) still busy after {} s; leaving",
            tasks.len(),
            DRAIN_TIMEOUT.as_secs()
        ));
    }
    report::info("stopped");
    Ok(())
}

/// An accepted client, before the handshake.
enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    Ok(match l {
        Listener::Unix(l, _) => Conn::Unix(l.accept().await?.0),
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            Conn::Tcp(s)
        }
    })
}

/// Binds the listener; returns it and the URI of the default export.
async fn bind(opts: &ServeOptions) -> Result<(Listener, String)> {
    if let Some(path) = &opts.socket {
        remove_stale_socket(path)?;
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("{}: cannot listen on this socket", path.display()))?;
        let uri = format!("nbd+unix:///?socket={}", path.display());
        return Ok((Listener::Unix(l, path.clone()), uri));
    }
    let addr = opts.listen.as_deref().unwrap_or_default();
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--listen {addr}: cannot listen there (HOST:PORT)"))?;
    let local = l.local_addr()?;
    if local.ip().is_unspecified() {
        report::warn(format!(
            "listening on {local}: every host that can reach this one can read these backups"
        ));
    }
    Ok((Listener::Tcp(l), format!("nbd://{local}/")))
}

/// A socket file left by a server that is gone is removed; a live one (someone accepts on
/// it) or anything that is not a socket is refused.
fn remove_stale_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !m.file_type().is_socket() {
        bail!(
            "{}: exists and is not a socket; not replacing it",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{}: another server is listening on this socket",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("{}: cannot remove", path.display()))
}

/// One client: handshake (within a time limit), then transmission on threads of its own.
async fn connection(
    conn: Conn,
    catalog: &Catalog,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (session, fd) = match conn {
        Conn::Unix(mut s) => (handshake(&mut s, catalog).await?, s.into_std()?.into()),
        Conn::Tcp(mut s) => (handshake(&mut s, catalog).await?, s.into_std()?.into()),
    };
    let Some(session) = session else {
        return Ok(());
    };
    let socket = Socket::new(fd)?;
    let stopper = socket.try_clone()?;
    let mut work =
        tokio::task::spawn_blocking(move || transmission::serve(&socket, &session, &shared));
    let done = tokio::select! {
        r = &mut work => r,
        _ = stop.changed() => {
            stopper.stop_reading();
            work.await
        }
    };
    done.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// The handshake, within [`HANDSHAKE_TIMEOUT`]: the session, or None when the client left.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    catalog: &Catalog,
) -> std::io::Result<Option<Session>> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let Some(flags) = greet(s).await? else {
            return Ok(None);
        };
        let mut n = Negotiation::new(catalog, flags);
        match n.run(s).await? {
            Outcome::Transmission(session) => Ok(Some(session)),
            Outcome::Closed => Ok(None),
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))?
}
