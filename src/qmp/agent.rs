//! A QEMU guest agent client (`--agent-socket`): the `guest-sync-delimited` handshake and
//! filesystem freeze/thaw with timeouts. The agent speaks QMP's JSON but has no greeting, no
//! capabilities and no events; a missing agent shows only as silence, so every read has a
//! timeout.

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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
        self.writer.write_all(&msg).await?;
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

    async fn read_reply(&mut self, deadline: tokio::time::Instant) -> Result<Value, AgentError> {
        loop {
            let mut line = Vec::new();
            match tokio::time::timeout_at(deadline, self.reader.read_until(b'\n', &mut line)).await
            {
                Err(_) => return Err(AgentError::Timeout(self.timeout.as_secs())),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => {
                    return Err(AgentError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "agent socket closed",
                    )))
                }
                Ok(Ok(_)) => {}
            }
            let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xff).collect();
            let text = String::from_utf8_lossy(&text);
            let t = text.trim();
            if t.is_empty() {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(t) {
                return Ok(v);
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
        self.writer.write_all(line.as_bytes()).await?;
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
