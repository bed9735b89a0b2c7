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

    /// A request that cannot be carried out (bad argument, out-of-range offset...).
    #[error("{0}")]
    Request(String),
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
#[macro_export]
#[doc(hidden)]
macro_rules! bail_format {
    ($($arg:tt)*) => { return Err($crate::error::FormatError::new(format!($($arg)*))) };
}
