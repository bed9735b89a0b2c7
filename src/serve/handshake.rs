//! The fixed-newstyle handshake: the greeting, then options until the client picks an
//! export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves. Unknown options get
//! `NBD_REP_ERR_UNSUP` and parsing goes on; malformed ones `NBD_REP_ERR_INVALID`; anything
//! that breaks the framing ends the connection.

use crate::serve::catalog::{Catalog, Export, Point, MAX_PAYLOAD};
use crate::serve::proto::*;
use crate::serve::reads::Context;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Option payloads larger than this end the connection (names and queries are short).
const MAX_OPTION: u32 = 64 << 10;

/// What the client negotiated for the transmission phase.
pub struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// Selected metadata contexts, with the ids the client was given.
    pub contexts: Vec<(u32, Context)>,
}

/// How the handshake ended.
pub enum Outcome {
    Transmission(Session),
    /// The client asked for TLS and was told yes: the caller runs the TLS handshake, marks
    /// the negotiation [`Tls::Active`] and goes on with it over the TLS stream.
    StartTls,
    /// The client left (ABORT, or a closed connection).
    Closed,
}

/// Transmission flags of an export: read-only, or writable through an overlay (a flush
/// on any connection makes every completed write durable, so multi-conn holds for both).
pub fn export_flags(export: &Export) -> u16 {
    let common = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if export.writable() {
        common | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
    } else {
        common | TF_READ_ONLY
    }
}

/// The id a context gets in `NBD_REP_META_CONTEXT` (fixed: the same on every connection).
fn context_id(c: Context) -> u32 {
    match c {
        Context::Allocation => 1,
        Context::Depth => 2,
    }
}

/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has none: STARTTLS is refused.
    Off,
    /// The server requires it (FORCEDTLS): every option but STARTTLS and ABORT is refused.
    Required,
    /// The connection is encrypted.
    Active,
}

/// Options of one connection, after the greeting and the client's flags.
pub struct Negotiation<'a> {
    pub catalog: &'a Catalog,
    pub no_zeroes: bool,
    pub tls: Tls,
    structured: bool,
    contexts: Vec<Context>,
    contexts_for: Option<String>,
}

/// Sends the greeting and reads the client's flags; Ok(None) when the client is not a
/// fixed-newstyle client (the connection is closed).
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<Option<u32>> {
    s.write_all(&greeting()).await?;
    s.flush().await?;
    let flags = s.read_u32().await?;
    let known = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;
    if flags & !known != 0 || flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Ok(None);
    }
    Ok(Some(flags))
}

impl<'a> Negotiation<'a> {
    pub fn new(catalog: &'a Catalog, client_flags: u32, tls: Tls) -> Negotiation<'a> {
        Negotiation {
            catalog,
            no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
            tls,
            structured: false,
            contexts: Vec::new(),
            contexts_for: None,
        }
    }

    /// Reads options until the transmission phase or the end.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
    ) -> std::io::Result<Outcome> {
        loop {
            let mut head = [0u8; 16];
            match s.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(Outcome::Closed)
                }
                Err(e) => return Err(e),
            }
            let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
            if magic != IHAVEOPT {
                return Err(invalid("option without IHAVEOPT"));
            }
            if len > MAX_OPTION {
                return Err(invalid("option payload over 64 KiB"));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            let mut out = Vec::new();
            let next = self.option(option, &data, &mut out);
            s.write_all(&out).await?;
            s.flush().await?;
            match next {
                Step::More => {}
                Step::Done(o) => return Ok(o),
                Step::Close => return Ok(Outcome::Closed),
            }
        }
    }

    /// Handles one option: its replies go to `out`.
    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        if self.tls == Tls::Required {
            return self.before_tls(option, data, out);
        }
        match option {
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Step::Close
            }
            OPT_STARTTLS if self.tls == Tls::Active => {
                err(out, option, REP_ERR_INVALID, "TLS is already on")
            }
            OPT_STARTTLS => err(
                out,
                option,
                REP_ERR_POLICY,
                "this server has no TLS configured",
            ),
            OPT_LIST if !data.is_empty() => err(out, option, REP_ERR_INVALID, "LIST takes no data"),
            OPT_LIST => {
                let cat = self.catalog;
                let default = &cat.points[cat.default];
                let entry = |out: &mut Vec<u8>, name: &str, desc: &str| {
                    let mut p = (name.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    p.extend_from_slice(desc.as_bytes());
                    option_reply(out, option, REP_SERVER, &p);
                };
                entry(
                    out,
                    "",
                    &format!(
                        "{} (the default export: {}{})",
                        default.description,
                        default.file.name,
                        if cat.has_overlay() {
                            "; writable, writes go to an overlay"
                        } else {
                            ""
                        }
                    ),
                );
                for p in &cat.points {
                    entry(out, &p.file.name, &p.description);
                }
                option_reply(out, option, REP_ACK, &[]);
                Step::More
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => err(
                out,
                option,
                REP_ERR_INVALID,
                "STRUCTURED_REPLY takes no data",
            ),
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                option_reply(out, option, REP_ACK, &[]);
                Step::More
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(data) else {
                    return Step::Close;
                };
                let Some((p, Ok(export))) = self.catalog.open_export(name) else {
                    return Step::Close;
                };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export_flags(&export).to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                let contexts = self.contexts_of(name, p);
                Step::Done(Outcome::Transmission(Session {
                    export,
                    structured: self.structured,
                    contexts,
                }))
            }
            _ => err(out, option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    /// An option before STARTTLS on a server that requires TLS.
    fn before_tls(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        match option {
            OPT_STARTTLS if !data.is_empty() => {
                err(out, option, REP_ERR_INVALID, "STARTTLS takes no data")
            }
            OPT_STARTTLS => {
                option_reply(out, option, REP_ACK, &[]);
                Step::Done(Outcome::StartTls)
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Step::Close
            }
            // It has no error reply: the connection ends.
            OPT_EXPORT_NAME => Step::Close,
            _ => err(
                out,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send STARTTLS first",
            ),
        }
    }

    /// The contexts selected for the export now entered (none when they were selected for
    /// another export).
    fn contexts_of(&self, name: &str, p: &Point) -> Vec<(u32, Context)> {
        let same = self
            .contexts_for
            .as_deref()
            .and_then(|n| self.catalog.find(n))
            .is_some_and(|q| q.file.path == p.file.path)
            || self.contexts_for.as_deref() == Some(name);
        if !same {
            return Vec::new();
        }
        self.contexts.iter().map(|&c| (context_id(c), c)).collect()
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return err(
                out,
                option,
                REP_ERR_INVALID,
                "SET_META_CONTEXT needs structured replies first",
            );
        }
        let mut p = Payload::new(data);
        let Some(name) = p.string() else {
            return err(out, option, REP_ERR_INVALID, "malformed export name");
        };
        let Some(n) = p.u32() else {
            return err(out, option, REP_ERR_INVALID, "malformed query count");
        };
        let mut queries = Vec::new();
        for _ in 0..n {
            match p.string() {
                Some(q) => queries.push(q),
                None => return err(out, option, REP_ERR_INVALID, "malformed query"),
            }
        }
        if !p.is_empty() {
            return err(out, option, REP_ERR_INVALID, "trailing bytes");
        }
        if self.catalog.find(name).is_none() {
            return err(out, option, REP_ERR_UNKNOWN, &format!("no export {name:?}"));
        }
        let mut chosen: Vec<Context> = Vec::new();
        if queries.is_empty() && !set {
            chosen.extend(Context::ALL);
        }
        for q in queries {
            for c in Context::matching(q, !set) {
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
        }
        for &c in &chosen {
            let mut p = context_id(c).to_be_bytes().to_vec();
            p.extend_from_slice(c.name().as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &p);
        }
        if set {
            self.contexts = chosen;
            self.contexts_for = Some(name.to_string());
        }
        option_reply(out, option, REP_ACK, &[]);
        Step::More
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let mut p = Payload::new(data);
        let Some(name) = p.string() else {
            return err(out, option, REP_ERR_INVALID, "malformed export name");
        };
        let Some(n) = p.u16() else {
            return err(out, option, REP_ERR_INVALID, "malformed request count");
        };
        let mut wanted = Vec::new();
        for _ in 0..n {
            match p.u16() {
                Some(i) => wanted.push(i),
                None => return err(out, option, REP_ERR_INVALID, "malformed info request"),
            }
        }
        if !p.is_empty() {
            return err(out, option, REP_ERR_INVALID, "trailing bytes");
        }
        let Some((point, opened)) = self.catalog.open_export(name) else {
            return err(
                out,
                option,
                REP_ERR_UNKNOWN,
                &format!("no export {name:?} (nbdinfo --list shows the points)"),
            );
        };
        let export = match opened {
            Ok(e) => e,
            Err(msg) => return err(out, option, REP_ERR_POLICY, &msg),
        };
        option_reply(
            out,
            option,
            REP_INFO,
            &info_export(export.size, export_flags(&export)),
        );
        option_reply(
            out,
            option,
            REP_INFO,
            &info_block_size(1, export.preferred, MAX_PAYLOAD),
        );
        if wanted.contains(&INFO_NAME) {
            option_reply(
                out,
                option,
                REP_INFO,
                &info_text(INFO_NAME, &point.file.name),
            );
        }
        if wanted.contains(&INFO_DESCRIPTION) {
            option_reply(
                out,
                option,
                REP_INFO,
                &info_text(INFO_DESCRIPTION, &point.description),
            );
        }
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_INFO {
            return Step::More;
        }
        let contexts = self.contexts_of(name, point);
        Step::Done(Outcome::Transmission(Session {
            export,
            structured: self.structured,
            contexts,
        }))
    }
}

enum Step {
    More,
    Done(Outcome),
    Close,
}

/// An error reply with a message; negotiation goes on.
fn err(out: &mut Vec<u8>, option: u32, kind: u32, msg: &str) -> Step {
    option_reply(out, option, kind, msg.as_bytes());
    Step::More
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}
