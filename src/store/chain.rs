//! A backup chain: a FULL and the INCs after it, in order.

use crate::store::file::BackupFile;
use crate::store::manifest::read_manifest;
use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupChain {
    pub full: BackupFile,
    pub incs: Vec<BackupFile>,
}

impl BackupChain {
    /// The chain's bitmap uuid, as its FULL's manifest records it (None without one).
    pub fn uuid(&self) -> Result<Option<String>> {
        Ok(read_manifest(&self.full.path)?.and_then(|m| m.uuid))
    }

    /// FULL first, then the INCs.
    pub fn files(&self) -> Vec<&BackupFile> {
        std::iter::once(&self.full)
            .chain(self.incs.iter())
            .collect()
    }

    /// The chain cut after the point `until` names.
    pub fn until(&self, until: &str) -> Result<BackupChain> {
        if self.full.matches_point(until) {
            return Ok(BackupChain {
                full: self.full.clone(),
                incs: Vec::new(),
            });
        }
        match self.incs.iter().position(|f| f.matches_point(until)) {
            Some(i) => Ok(BackupChain {
                full: self.full.clone(),
                incs: self.incs[..=i].to_vec(),
            }),
            None => bail!(
                "--until {until:?} names no point of this chain; points: {}",
                self.files()
                    .iter()
                    .map(|f| f.stem().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The last point of the chain.
    pub fn newest(&self) -> &BackupFile {
        self.incs.last().unwrap_or(&self.full)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::chain::BackupChain;
    use crate::store::file::BackupFile;
    use std::path::Path;

    fn chain(full: &str, incs: &[&str]) -> BackupChain {
        let f = |n: &str| BackupFile::parse(Path::new(n)).unwrap();
        BackupChain {
            full: f(full),
            incs: incs.iter().map(|n| f(n)).collect(),
        }
    }

    #[test]
    fn until_cuts_after_the_named_point() {
        let c = chain("FULL-10-d.qcow2", &["INC-20-d.qcow2", "INC-30-d.qcow2"]);
        assert_eq!(c.newest().name, "INC-30-d.qcow2");
        assert_eq!(c.files().len(), 3);
        let cut = c.until("INC-20").unwrap();
        assert_eq!(cut.incs.len(), 1);
        assert_eq!(cut.newest().name, "INC-20-d.qcow2");
        let cut = c.until("FULL-10-d").unwrap();
        assert!(cut.incs.is_empty());
        assert_eq!(cut.newest().name, "FULL-10-d.qcow2");
        assert_eq!(c.until("INC-30-d.qcow2").unwrap(), c);
    }

    #[test]
    fn until_an_unknown_point_lists_the_points() {
        let c = chain("FULL-10-d.qcow2", &["INC-20-d.qcow2"]);
        let e = c.until("INC-25").unwrap_err().to_string();
        assert!(e.contains("names no point"), "{e}");
        assert!(e.contains("FULL-10-d, INC-20-d"), "{e}");
    }
}
