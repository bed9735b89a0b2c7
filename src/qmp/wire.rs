//! Reading newline-terminated JSON messages from a peer with a bound on their size: a peer
//! that streams bytes without a line end gets a clear error, not our memory.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// The largest message accepted from QEMU or the guest agent: far above any real reply
/// (`query-named-block-nodes` of a VM with hundreds of disks is a few MiB).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Reads one line (without its end) of at most `max` bytes. Ok(None) at end of stream with
/// nothing read; a last line without an end is returned as it is.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the peer sent more than {} MiB without a line end: not a QMP message",
                    max >> 20
                ),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

/// The start of a bad message, for an error text.
pub fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
    if bytes.len() > 120 {
        format!("{text}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use crate::qmp::wire::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let data = b"{\"a\":1}\r\n{\"b\":2}\npartial".to_vec();
        let mut r = tokio::io::BufReader::new(&data[..]);
        assert_eq!(
            read_line_bounded(&mut r, 100).await.unwrap().unwrap(),
            b"{\"a\":1}"
        );
        assert_eq!(
            read_line_bounded(&mut r, 100).await.unwrap().unwrap(),
            b"{\"b\":2}"
        );
        assert_eq!(
            read_line_bounded(&mut r, 100).await.unwrap().unwrap(),
            b"partial"
        );
        assert!(read_line_bounded(&mut r, 100).await.unwrap().is_none());
        let long = vec![b'x'; 1000];
        let mut r = tokio::io::BufReader::with_capacity(64, &long[..]);
        let e = read_line_bounded(&mut r, 100).await.unwrap_err();
        assert!(e.to_string().contains("without a line end"), "{e}");
    }
}
