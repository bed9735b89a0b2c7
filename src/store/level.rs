//! The level of a backup file on disk: what its name starts with.

use serde::Serialize;

/// What a backup file holds: a FULL starts a chain, an INC holds the changes since the
/// previous point of its chain, a COPY is a standalone full copy outside any chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum BackupLevel {
    #[serde(rename = "FULL")]
    Full,
    #[serde(rename = "INC")]
    Inc,
    #[serde(rename = "COPY")]
    Copy,
}

impl BackupLevel {
    pub const ALL: [BackupLevel; 3] = [BackupLevel::Full, BackupLevel::Inc, BackupLevel::Copy];

    /// The file name prefix (without its `-`), as written and as parsed.
    pub fn prefix(self) -> &'static str {
        match self {
            BackupLevel::Full => "FULL",
            BackupLevel::Inc => "INC",
            BackupLevel::Copy => "COPY",
        }
    }

    /// The level a prefix names (`FULL`, `INC`, `COPY`; case matters).
    pub fn from_prefix(prefix: &str) -> Option<BackupLevel> {
        BackupLevel::ALL.into_iter().find(|l| l.prefix() == prefix)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::level::BackupLevel;

    #[test]
    fn prefixes_round_trip_and_are_case_sensitive() {
        for l in BackupLevel::ALL {
            assert_eq!(BackupLevel::from_prefix(l.prefix()), Some(l));
        }
        assert_eq!(BackupLevel::from_prefix("full"), None);
        assert_eq!(BackupLevel::from_prefix("DIFF"), None);
        assert_eq!(BackupLevel::from_prefix(""), None);
    }

    #[test]
    fn serialises_as_the_prefix() {
        assert_eq!(
            serde_json::to_string(&BackupLevel::ALL).unwrap(),
            r#"["FULL","INC","COPY"]"#
        );
    }

    #[test]
    fn orders_full_before_inc_before_copy() {
        // Files with equal timestamps are ordered by level: a FULL first, so an INC taken in
        // the same second follows it.
        assert!(BackupLevel::Full < BackupLevel::Inc && BackupLevel::Inc < BackupLevel::Copy);
    }
}
