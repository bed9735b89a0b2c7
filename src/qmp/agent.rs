//! A QEMU guest agent client (`--agent-socket`): the `guest-sync-delimited` handshake and
//! filesystem freeze/thaw with timeouts. The agent speaks QMP's JSON but has no greeting, no
//! capabilities and no events; a missing agent shows only as silence, so every read has a
//! timeout.

use crate::qmp::wire::{excerpt, read_line_bounded, MAX_MESSAGE};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest agent did not answer within {0} s (is qemu-ga running in the guest?)")]
    Timeout(u64),
    #[error("guest agent: {0}")]
    Command(String),
    #[error("guest agent: unexpected reply: {0}")]
    Protocol(String),
}

pub struct Agent {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

/// What `guest-info` says about freezing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreezeSupport {
    pub supported: bool,
    pub enabled: bool,
}

impl Agent {
    pub async fn connect(path: &str, timeout: Duration) -> Result<Agent, AgentError> {
        let s = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| AgentError::Timeout(timeout.as_secs()))?
            .map_err(|e| {
                AgentError::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot connect to agent socket {path}: {e}"),
                ))
            })?;
        let (r, w) = s.into_split();
        let mut a = Agent {
            reader: BufReader::new(r),
            writer: w,
            timeout,
        };
        a.sync().await?;
        Ok(a)
    }

    /// Resets the agent's parser (0xFF) and waits for the echo of a random id, skipping
    /// stale replies and the parser's error reply.
    pub async fn sync(&mut self) -> Result<(), AgentError> {
        let id = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i64
            & 0x3fff_ffff_ffff)
            ^ std::process::id() as i64;
        let mut msg = vec![0xffu8];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.send(&msg).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Discard everything up to the 0xFF delimiter.
        loop {
            let mut b = [0u8; 1];
            match tokio::time::timeout_at(deadline, self.reader.read_exact(&mut b)).await {
                Err(_) => return Err(AgentError::Timeout(self.timeout.as_secs())),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(_)) if b[0] == 0xff => break,
                Ok(Ok(_)) => {}
            }
        }
        loop {
            let v = self.read_reply(deadline).await?;
            if v.get("return").and_then(Value::as_i64) == Some(id) {
                return Ok(());
            }
        }
    }

    /// Sends bytes; an agent that stops reading cannot keep us waiting past the timeout.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        match tokio::time::timeout(self.timeout, self.writer.write_all(bytes)).await {
            Err(_) => Err(AgentError::Timeout(self.timeout.as_secs())),
            Ok(r) => Ok(r?),
        }
    }

    /// The next reply. The 0xFF delimiter bytes of a sync are dropped; anything else that is
    /// not a JSON object, or a line over [`MAX_MESSAGE`], is a protocol error at once.
    async fn read_reply(&mut self, deadline: tokio::time::Instant) -> Result<Value, AgentError> {
        loop {
            let read = read_line_bounded(&mut self.reader, MAX_MESSAGE);
            let line = match tokio::time::timeout_at(deadline, read).await {
                Err(_) => return Err(AgentError::Timeout(self.timeout.as_secs())),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(None)) => {
                    return Err(AgentError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "agent socket closed",
                    )))
                }
                Ok(Ok(Some(l))) => l,
            };
            let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xff).collect();
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Value>(&text) {
                Ok(v) if v.is_object() => return Ok(v),
                _ => {
                    return Err(AgentError::Protocol(format!(
                        "not a guest agent message: {:?}",
                        excerpt(&text)
                    )))
                }
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Value) -> Result<Value, AgentError> {
        let mut msg = json!({"execute": command});
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.send(line.as_bytes()).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let v = self.read_reply(deadline).await?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(AgentError::Command(format!(
                "{command}: {}",
                e["desc"].as_str().unwrap_or("error")
            )));
        }
        Err(AgentError::Protocol(v.to_string()))
    }

    pub async fn freeze_support(&mut self) -> Result<FreezeSupport, AgentError> {
        let info = self.execute("guest-info", Value::Null).await?;
        let cmd = info["supported_commands"].as_array().and_then(|a| {
            a.iter()
                .find(|c| c["name"] == "guest-fsfreeze-freeze")
                .cloned()
        });
        Ok(match cmd {
            Some(c) => FreezeSupport {
                supported: true,
                enabled: c["enabled"].as_bool().unwrap_or(false),
            },
            None => FreezeSupport {
                supported: false,
                enabled: false,
            },
        })
    }

    pub async fn status(&mut self) -> Result<String, AgentError> {
        let v = self.execute("guest-fsfreeze-status", Value::Null).await?;
        Ok(v.as_str().unwrap_or("").to_string())
    }

    /// Freezes the guest filesystems; returns how many were frozen.
    pub async fn freeze(&mut self) -> Result<i64, AgentError> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null).await?;
        Ok(v.as_i64().unwrap_or(0))
    }

    /// Thaws the guest filesystems; returns how many were thawed.
    pub async fn thaw(&mut self) -> Result<i64, AgentError> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        Ok(v.as_i64().unwrap_or(0))
    }
}
