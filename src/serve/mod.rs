//! `qmprestore serve`: every point in time of a backup directory as an NBD export, read
//! straight from the backup files (no merge first), every block checked against its file's
//! manifest. Tokio listens, haggles and handles signals; once a client enters the
//! transmission phase, its requests are answered on worker threads of its own.
//!
//! - `catalog`: the points and how they are opened;
//! - `handshake`: the fixed-newstyle option haggling;
//! - `transmission`: requests and replies (the worker threads);
//! - `overlay`: the default export's writable overlay (`--overlay`);
//! - `tls`: the TLS acceptor and the pump between TLS and the workers;
//! - `reads`: what a read or a block status resolves to in a chain;
//! - `proto`: the wire format.

pub mod catalog;
pub mod handshake;
pub mod overlay;
pub mod proto;
pub mod reads;
pub mod tls;
pub mod transmission;

use crate::report;
use crate::restore::options::CheckOptions;
use crate::store::lock::{lock_dir, LockMode};
use anyhow::{bail, Context, Result};
use catalog::Catalog;
use handshake::{greet, Negotiation, Outcome, Session, Tls};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
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
    /// Make the default export writable: writes go into this qcow2 file (created when
    /// missing), never into the backups. Serving the same point with the same file again
    /// continues from it; the file refuses any other point.
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,
    /// Require TLS (clients must send STARTTLS) with this certificate: PEM, the server's
    /// certificate first, then any intermediates.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require every client to present a certificate signed by this CA (PEM). Use it
    /// whenever the server listens beyond this host.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
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
    let _lock = lock_dir(&opts.dir, LockMode::Shared)?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key, opts.tls_ca.as_deref())?),
        _ => None,
    };
    let catalog = Catalog::scan(
        &opts.dir,
        opts.filter.as_deref(),
        opts.until.as_deref(),
        checks,
    )?
    .with_overlay(opts.overlay.clone());
    // The default export is opened (and checked) now: a damaged chain is an error at
    // start-up, not at the first client.
    if let Some((_, Err(m))) = catalog.open_export("") {
        bail!("{m}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let catalog = Arc::new(catalog);
    let served = rt.block_on(run(opts, catalog.clone(), tls));
    if let Some(o) = catalog.overlay() {
        o.flush().with_context(|| {
            format!(
                "{}: the last writes could not be flushed",
                o.path().display()
            )
        })?;
        report::info(format!("{}: every write is flushed", o.path().display()));
    }
    served
}

enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

async fn run(opts: &ServeOptions, catalog: Arc<Catalog>, tls: Option<TlsAcceptor>) -> Result<()> {
    let (listener, uri) = bind(opts, tls.is_some()).await?;
    let default = &catalog.points[catalog.default];
    report::info(format!(
        "serving {} point(s) of {}; the default export is {} ({})",
        catalog.points.len(),
        opts.dir.display(),
        default.file.name,
        default.description
    ));
    if let Some(o) = catalog.overlay() {
        report::info(format!(
            "the default export is writable: writes go to {} (the backups are not changed)",
            o.path().display()
        ));
    }
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
        let tls = tls.clone();
        tasks.spawn(async move {
            let served = match stream {
                Conn::Unix(s) => connection(s, &catalog, tls, shared, stop).await,
                Conn::Tcp(s) => connection(s, &catalog, tls, shared, stop).await,
            };
            if let Err(e) = served {
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
async fn bind(opts: &ServeOptions, tls: bool) -> Result<(Listener, String)> {
    let scheme = if tls { "nbds" } else { "nbd" };
    if let Some(path) = &opts.socket {
        remove_stale_socket(path)?;
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("{}: cannot listen on this socket", path.display()))?;
        let uri = format!("{scheme}+unix:///?socket={}", path.display());
        return Ok((Listener::Unix(l, path.clone()), uri));
    }
    let addr = opts.listen.as_deref().unwrap_or_default();
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--listen {addr}: cannot listen there (HOST:PORT)"))?;
    let local = l.local_addr()?;
    if local.ip().is_unspecified() && !(tls && opts.tls_ca.is_some()) {
        report::warn(format!(
            "listening on {local}: every host that can reach this one can read these backups; use --tls-cert/--tls-key with --tls-ca to admit only clients with a certificate you signed"
        ));
    }
    Ok((Listener::Tcp(l), format!("{scheme}://{local}/")))
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

/// A stream the workers can take over as a plain socket.
trait IntoFd: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_fd(self) -> std::io::Result<OwnedFd>;
}

impl IntoFd for tokio::net::UnixStream {
    fn into_fd(self) -> std::io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

impl IntoFd for tokio::net::TcpStream {
    fn into_fd(self) -> std::io::Result<OwnedFd> {
        Ok(self.into_std()?.into())
    }
}

/// One client: handshake (within [`HANDSHAKE_TIMEOUT`], TLS included when the server has
/// it), then transmission on worker threads of its own. A TLS connection's workers talk to
/// a socket pair whose other end a task carries through TLS.
async fn connection<S: IntoFd>(
    mut s: S,
    catalog: &Catalog,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let Some(flags) = in_time(deadline, greet(&mut s)).await? else {
        return Ok(());
    };
    let required = if tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    let mut n = Negotiation::new(catalog, flags, required);
    let (session, secure) = match (in_time(deadline, n.run(&mut s)).await?, tls) {
        (Outcome::Transmission(session), _) => {
            return transmit(Socket::new(s.into_fd()?)?, session, shared, stop).await;
        }
        (Outcome::StartTls, Some(tls)) => {
            let mut secure = match in_time(deadline, tls.accept(s)).await {
                Ok(secure) => secure,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(e),
                Err(e) => {
                    // Worth the operator's eye: a wrong certificate on either side.
                    report::warn(format!("a client failed the TLS handshake: {e}"));
                    return Ok(());
                }
            };
            n.tls = Tls::Active;
            match in_time(deadline, n.run(&mut secure)).await? {
                Outcome::Transmission(session) => (session, secure),
                _ => return Ok(()),
            }
        }
        _ => return Ok(()),
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    let pump = tokio::spawn(tls::pump(secure, tokio::net::UnixStream::from_std(theirs)?));
    let served = transmit(Socket::new(ours.into())?, session, shared, stop).await;
    let _ = pump.await;
    served
}

/// Runs the transmission workers until the connection ends; `stop` makes them take no
/// more requests.
async fn transmit(
    socket: Socket,
    session: Session,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
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

/// A step of the handshake, which must be over by `deadline`.
async fn in_time<T>(
    deadline: tokio::time::Instant,
    step: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout_at(deadline, step)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))?
}
