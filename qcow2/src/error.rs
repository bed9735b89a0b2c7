//! One error type for the crate. Every variant says which file and, where it matters, which
//! offset, so a user can tell a damaged image from a bug or a full disk.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not a valid image (or not of the expected kind).
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },

    /// The image uses a feature this library does not implement.
    #[error("{path}: not supported: {msg}")]
    Unsupported { path: String, msg: String },

    /// Reading or writing the file failed. The OS error is part of the message (and not
    /// also a `source()`, which would print it twice in an error chain).
    #[error("{path}: {op} at offset {offset:#x}: {cause}")]
    Io {
        path: String,
        op: &'static str,
        offset: u64,
        cause: io::Error,
    },

    /// Opening, creating or renaming a file failed.
    #[error("{path}: {op}: {cause}")]
    File {
        path: String,
        op: &'static str,
        cause: io::Error,
    },

    /// The caller asked for something that cannot be done: a bad argument or option, an
    /// offset past the end, a name that is not there. `path` is the file it concerns, empty
    /// when the request is about no file in particular.
    #[error("{}{msg}", prefix(path))]
    Usage { path: String, msg: String },

    /// Not the user's doing: a bug, or a worker thread that died. `path` as for `Usage`.
    #[error("{}internal error: {msg}", prefix(path))]
    Internal { path: String, msg: String },
}

fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl Error {
    pub fn invalid(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn unsupported(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<String>, op: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            offset,
            cause: source,
        }
    }

    pub fn file(path: impl Into<String>, op: &'static str, source: io::Error) -> Self {
        Error::File {
            path: path.into(),
            op,
            cause: source,
        }
    }

    /// A request about `path` that cannot be carried out (see [`Error::Usage`]).
    pub fn usage(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Usage {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A request about no file in particular that cannot be carried out.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Error::usage("", msg)
    }

    /// Something that should not happen (see [`Error::Internal`]).
    pub fn internal(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Internal {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Whether the error is the caller's mistake rather than the image's or the system's.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage { .. })
    }
}

/// Adds the file and the operation to an `io::Error`: `storage.read_at(..).at(path,
/// "reading data", offset)?` instead of a `map_err` closure at every call.
pub trait IoContext<T> {
    /// An I/O error at `offset` of `path`.
    fn at(self, path: &str, op: &'static str, offset: u64) -> Result<T>;
    /// An error opening, creating or renaming `path`.
    fn on_file(self, path: &str, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &str, op: &'static str, offset: u64) -> Result<T> {
        self.map_err(|e| Error::io(path, op, offset, e))
    }

    fn on_file(self, path: &str, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::file(path, op, e))
    }
}

/// Errors of the pure format layer (no path known there); the image layer adds the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

impl FormatError {
    pub fn new(msg: impl Into<String>) -> Self {
        FormatError(msg.into())
    }
}

/// Shorthand for returning a [`FormatError`] from format code.
macro_rules! bail_format {
    ($($arg:tt)*) => { return Err($crate::error::FormatError::new(format!($($arg)*))) };
}
pub(crate) use bail_format;
