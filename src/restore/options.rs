//! The options the restore commands share, as the command line gives them.

use anyhow::Result;
use std::path::PathBuf;

/// Which backups a command works on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DirOptions {
    /// The disk's backup directory (e.g. /backup/vm1/disk1).
    #[arg(long)]
    pub dir: PathBuf,
    /// Use only files whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
}

/// How far into the chain a command goes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct UntilOption {
    /// Restore up to this point: a file name, the name without extension, or INC-<time>.
    #[arg(long)]
    pub until: Option<String>,
}

pub use crate::store::fold::CheckOptions;

/// A copy's speed limit.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RateOption {
    /// Limit the copy to this many bytes per second (K/M/G suffixes allowed).
    #[arg(long)]
    pub rate_limit: Option<String>,
}

impl RateOption {
    /// Bytes per second; 0 when unlimited.
    pub fn bytes_per_second(&self) -> Result<u64> {
        match &self.rate_limit {
            Some(s) => qcow2::create::parse_size(s).ok_or_else(|| {
                anyhow::anyhow!("invalid --rate-limit {s:?} (bytes per second, e.g. 50M)")
            }),
            None => Ok(0),
        }
    }
}

/// Options every command takes.
#[derive(Debug, Clone, Default)]
pub struct Common {
    pub source: DirOptions,
    pub until: Option<String>,
    pub check: CheckOptions,
}

#[cfg(test)]
mod tests {
    use crate::restore::options::RateOption;

    #[test]
    fn rate_limits_parse_with_suffixes() {
        let rate = |s: Option<&str>| {
            RateOption {
                rate_limit: s.map(str::to_string),
            }
            .bytes_per_second()
        };
        assert_eq!(rate(None).unwrap(), 0);
        assert_eq!(rate(Some("50M")).unwrap(), 50 << 20);
        assert_eq!(rate(Some("1024")).unwrap(), 1024);
        let e = rate(Some("fast")).unwrap_err().to_string();
        assert!(e.contains("invalid --rate-limit \"fast\""), "{e}");
    }
}
