//! A tokio QMP client: one reader task routes replies to their requests by id and queues
//! events (which QEMU often sends between a command and its reply).

use crate::qmp::wire::{excerpt, read_line_bounded, MAX_MESSAGE};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered with an error.
    #[error("{command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection closed by QEMU (did the VM exit?)")]
    Disconnected,
    #[error("{0}")]
    Timeout(String),
    #[error("QMP {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The caller's deadline for talking to QEMU passed (after a signal, say).
    #[error("gave up waiting for QEMU ({0})")]
    GaveUp(String),
}

impl QmpError {
    pub fn desc(&self) -> String {
        match self {
            QmpError::Command { desc, .. } => desc.clone(),
            other => other.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

pub struct Qmp {
    writer: Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    events: Mutex<mpsc::UnboundedReceiver<Event>>,
    next_id: AtomicU64,
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// Why the connection ended, when QEMU (or whatever answered) broke the protocol.
    failure: Arc<std::sync::Mutex<Option<String>>>,
    /// When to stop waiting for QEMU at all: every call and every wait ends by then.
    deadline: std::sync::Mutex<Option<watch::Receiver<Option<Instant>>>>,
    pub greeting: Value,
    pub timeout: Duration,
}

/// Parses one message of the peer; a message that is not a JSON object is a protocol error.
fn parse_message(line: &[u8]) -> Result<Value, String> {
    match serde_json::from_slice::<Value>(line) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) | Err(_) => Err(format!(
            "the peer sent something that is not a QMP message: {:?}",
            excerpt(line)
        )),
    }
}

/// How long to wait for QEMU's greeting: a busy socket accepts the connection but stays
/// silent until the other client leaves.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

impl Qmp {
    /// Connects to `unix:PATH`, `PATH` or `tcp:HOST:PORT`, reads the greeting and negotiates
    /// capabilities.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Qmp, QmpError> {
        let (r, w): (
            Box<dyn AsyncRead + Send + Unpin>,
            Box<dyn AsyncWrite + Send + Unpin>,
        ) = if let Some(hp) = addr.strip_prefix("tcp:") {
            let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(hp))
                .await
                .map_err(|_| QmpError::Timeout(format!("connecting to {hp} timed out")))??;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        } else {
            let path = addr.strip_prefix("unix:").unwrap_or(addr);
            let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                .await
                .map_err(|_| QmpError::Timeout(format!("connecting to {path} timed out")))?
                .map_err(|e| {
                    QmpError::Io(std::io::Error::new(
                        e.kind(),
                        format!("cannot connect to QMP socket {path}: {e}"),
                    ))
                })?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        };
        let mut lines = BufReader::new(r);
        let first =
            tokio::time::timeout(GREETING_TIMEOUT, read_line_bounded(&mut lines, MAX_MESSAGE));
        let greeting = match first.await {
            Err(_) => {
                return Err(QmpError::Timeout(format!(
                    "no greeting from QEMU on {addr} within {} s: the QMP socket is busy (QMP serves one client at a time). \
                     Give backups a dedicated socket: start QEMU with an extra \
                     `-chardev socket,id=qmp-backup,path=/run/vm-backup.qmp,server=on,wait=off -mon chardev=qmp-backup,mode=control`",
                    GREETING_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(Some(l))) => parse_message(&l)
                .map_err(|e| QmpError::Protocol(format!("{addr}: bad greeting: {e}")))?,
            Ok(Ok(None)) => return Err(QmpError::Disconnected),
            Ok(Err(e)) => return Err(e.into()),
        };
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "{addr} is not a QMP socket (greeting: {greeting})"
            )));
        }
        let pending: Pending = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let (etx, erx) = mpsc::unbounded_channel();
        let p2 = pending.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed2 = closed.clone();
        let failure: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let failure2 = failure.clone();
        tokio::spawn(async move {
            let mut broken = None;
            loop {
                let line = match read_line_bounded(&mut lines, MAX_MESSAGE).await {
                    Ok(Some(l)) => l,
                    Ok(None) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        broken = Some(e.to_string());
                        break;
                    }
                    Err(_) => break,
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v = match parse_message(&line) {
                    Ok(v) => v,
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                };
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let _ = etx.send(Event {
                        name: name.to_string(),
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                    });
                    continue;
                }
                let Some(id) = v.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(tx) = p2.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) else {
                    continue;
                };
                let res = if let Some(r) = v.get("return") {
                    Ok(r.clone())
                } else if let Some(e) = v.get("error") {
                    Err(QmpError::Command {
                        command: String::new(),
                        class: e["class"].as_str().unwrap_or("").to_string(),
                        desc: e["desc"].as_str().unwrap_or("").to_string(),
                    })
                } else {
                    Err(QmpError::Protocol(format!("unexpected reply {v}")))
                };
                let _ = tx.send(res);
            }
            // Connection gone (or the peer broke the protocol): fail everything waiting.
            if let Some(b) = &broken {
                *failure2.lock().unwrap_or_else(|e| e.into_inner()) = Some(b.clone());
            }
            closed2.store(true, Ordering::SeqCst);
            for (_, tx) in p2.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = tx.send(Err(match &broken {
                    Some(b) => QmpError::Protocol(b.clone()),
                    None => QmpError::Disconnected,
                }));
            }
        });
        let qmp = Qmp {
            writer: Mutex::new(w),
            pending,
            events: Mutex::new(erx),
            next_id: AtomicU64::new(1),
            closed,
            failure,
            deadline: std::sync::Mutex::new(None),
            greeting,
            timeout,
        };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs a command; returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.timeout).await
    }

    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let limit = Instant::now() + timeout;
        if self.past_deadline() {
            return Err(QmpError::GaveUp(format!("{command} not sent")));
        }
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        // The reader task sets `closed` before it fails what is pending: a request added
        // after that sees it here instead of waiting for a reply that cannot come.
        if let Some(e) = self.closed_error() {
            self.forget(id);
            return Err(e);
        }
        let mut msg = json!({"execute": command, "id": id});
        if !arguments.is_null() && arguments.as_object().is_none_or(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        crate::report::debug(format!("-> {msg}"));
        let mut line = msg.to_string();
        line.push('\n');
        let send = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        // A peer that stops reading fills the socket: the write is bounded too.
        match self.bounded(limit, send).await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                self.forget(id);
                return Err(e.into());
            }
            None => {
                self.forget(id);
                return Err(self.wait_error(command, timeout, "could not send"));
            }
        }
        let res = match self.bounded(limit, &mut rx).await {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(self.closed_error().unwrap_or(QmpError::Disconnected)),
            None => {
                self.forget(id);
                Err(self.wait_error(command, timeout, "no reply"))
            }
        };
        crate::report::debug(format!("<- {command}: {res:?}"));
        res.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            },
            other => other,
        })
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn wait_error(&self, command: &str, timeout: Duration, what: &str) -> QmpError {
        if self.past_deadline() {
            QmpError::GaveUp(format!("{command}: {what}"))
        } else {
            QmpError::Timeout(format!(
                "{command}: {what} from QEMU within {} s",
                timeout.as_secs()
            ))
        }
    }

    /// The error for a connection that has ended, if it has.
    fn closed_error(&self) -> Option<QmpError> {
        if self.is_connected() {
            return None;
        }
        Some(match self.failure() {
            Some(f) => QmpError::Protocol(f),
            None => QmpError::Disconnected,
        })
    }

    /// Runs `fut` until it ends, `limit` passes, or the deadline passes (also one set while
    /// waiting); None when it did not end.
    async fn bounded<F: std::future::Future>(&self, limit: Instant, fut: F) -> Option<F::Output> {
        let mut deadline = self
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio::pin!(fut);
        loop {
            let cap = match deadline.as_mut() {
                Some(rx) => rx.borrow_and_update().map_or(limit, |d| d.min(limit)),
                None => limit,
            };
            let changed = async {
                match deadline.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = tokio::time::sleep_until(cap) => return None,
                _ = changed => continue,
            }
        }
    }

    /// Makes every call and wait end by the instant `rx` holds (None: no limit), also calls
    /// already waiting when it changes. A backup sets it when a signal asks it to stop.
    pub fn follow_deadline(&self, rx: watch::Receiver<Option<Instant>>) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
    }

    /// Whether the deadline set through [`Qmp::follow_deadline`] has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|rx| *rx.borrow())
            .is_some_and(|d| Instant::now() >= d)
    }

    /// Why the connection ended, when the peer broke the protocol (not JSON, a message
    /// without an end).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs a command and decodes its reply.
    pub async fn query<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, arguments).await?;
        serde_json::from_value(v)
            .map_err(|e| QmpError::Protocol(format!("{command}: unexpected reply: {e}")))
    }

    /// The next event, waiting at most `timeout` (and never past the deadline); None on
    /// timeout or disconnect.
    pub async fn next_event(&self, timeout: Duration) -> Option<Event> {
        let limit = Instant::now() + timeout;
        let mut rx = self.events.lock().await;
        match self.bounded(limit, rx.recv()).await {
            Some(Some(e)) => Some(e),
            Some(None) => {
                // Closed: do not spin.
                let _ = self
                    .bounded(limit, tokio::time::sleep(Duration::from_millis(200)))
                    .await;
                None
            }
            None => None,
        }
    }

    /// Whether the connection is still open (the reader task has not ended).
    pub fn is_connected(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    /// An HMP command through QMP; HMP errors come back as text.
    pub async fn hmp(&self, command_line: &str) -> Result<String, QmpError> {
        let v = self
            .execute(
                "human-monitor-command",
                json!({"command-line": command_line}),
            )
            .await?;
        Ok(v.as_str().unwrap_or("").to_string())
    }
}
