//! A tokio QMP client: one reader task routes replies to their requests by id and queues
//! events (which QEMU often sends between a command and its reply).

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, Mutex};

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
    pub greeting: Value,
    pub timeout: Duration,
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
            let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                QmpError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot connect to QMP socket {path}: {e}"),
                ))
            })?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        };
        let mut lines = BufReader::new(r).lines();
        let greeting = match tokio::time::timeout(GREETING_TIMEOUT, lines.next_line()).await {
            Err(_) => {
                return Err(QmpError::Timeout(format!(
                    "no greeting from QEMU on {addr} within {} s: the QMP socket is busy (QMP serves one client at a time). \
                     Give backups a dedicated socket: start QEMU with an extra \
                     `-chardev socket,id=qmp-backup,path=/run/vm-backup.qmp,server=on,wait=off -mon chardev=qmp-backup,mode=control`",
                    GREETING_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(Some(l))) => serde_json::from_str::<Value>(l.trim_end())
                .map_err(|e| QmpError::Protocol(format!("bad greeting: {e}")))?,
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
        tokio::spawn(async move {
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    _ => break,
                };
                let Ok(v) = serde_json::from_str::<Value>(line.trim_end()) else {
                    continue;
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
            // Connection gone: fail everything still waiting.
            closed2.store(true, Ordering::SeqCst);
            for (_, tx) in p2.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = tx.send(Err(QmpError::Disconnected));
            }
        });
        let qmp = Qmp {
            writer: Mutex::new(w),
            pending,
            events: Mutex::new(erx),
            next_id: AtomicU64::new(1),
            closed,
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let mut msg = json!({"execute": command, "id": id});
        if !arguments.is_null() && arguments.as_object().is_none_or(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        crate::report::debug(format!("-> {msg}"));
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await?;
        }
        let res = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(QmpError::Timeout(format!(
                    "{command}: no reply from QEMU within {} s",
                    timeout.as_secs()
                )))
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

    /// The next event, waiting at most `timeout`; None on timeout or disconnect.
    pub async fn next_event(&self, timeout: Duration) -> Option<Event> {
        let mut rx = self.events.lock().await;
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(e)) => Some(e),
            Ok(None) => {
                // Closed: do not spin.
                tokio::time::sleep(timeout.min(Duration::from_millis(200))).await;
                None
            }
            Err(_) => None,
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
