//! What a prune does to one disk's backups: which points a keep-policy keeps
//! ([`crate::store::retention`]) and the file operations that remove the others while
//! every kept point restores exactly as before. Pure: it reads nothing and writes nothing.
//!
//! A disk's timeline is its chains (FULL, then INCs; across month folders, oldest first).
//! Removing a point of a chain means folding its changes into the next kept point:
//! - the FULL's point removed, the first kept point INCk: INC1..INCk are committed into the
//!   FULL, which then takes INCk's time in its name;
//! - INCs removed between two kept points: folded into the kept INC after them;
//! - INCs after a chain's last kept point (an older chain's tail): nothing depends on them;
//!   removed;
//! - a chain with no kept point: removed whole.
//!
//! The newest point of the newest chain is always kept: the next incremental continues from
//! it. COPY files are self-contained points: they form a timeline of their own, pruned by the
//! same rules, and are removed without folding.

use crate::store::chain::BackupChain;
use crate::store::file::BackupFile;
use crate::store::level::BackupLevel;
use crate::store::name::backup_file_name;
use crate::store::retention::{select, KeepPolicy, Rule, Verdict, Zone};
use serde::Serialize;

/// Why a point stays or goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Kept by this rule.
    Kept(#[serde(serialize_with = "rule_name")] Rule),
    /// Kept whatever the policy: the newest point of the newest chain.
    Newest,
    /// No rule keeps it.
    NotKept,
}

fn rule_name<S: serde::Serializer>(r: &Rule, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.option())
}

impl Reason {
    pub fn is_kept(self) -> bool {
        !matches!(self, Reason::NotKept)
    }
}

/// One point of the timeline and what becomes of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedPoint {
    pub file: BackupFile,
    pub reason: Reason,
}

/// A file operation of the prune, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Commit `incs` (oldest first) into `full`, rename it `renamed_to` (the last INC's
    /// point), and remove the INC files.
    FoldIntoFull {
        full: BackupFile,
        incs: Vec<BackupFile>,
        renamed_to: String,
    },
    /// Fold the changes of `removed` (consecutive INCs, oldest first) into `into`, the kept
    /// INC after them, and remove their files.
    FoldIntoNext {
        removed: Vec<BackupFile>,
        into: BackupFile,
    },
    /// Remove files no kept point needs.
    Remove { files: Vec<BackupFile> },
}

impl Action {
    /// The backup files that are gone once the action is done.
    pub fn removed_files(&self) -> Vec<&BackupFile> {
        match self {
            Action::FoldIntoFull { incs, .. } => incs.iter().collect(),
            Action::FoldIntoNext { removed, .. } => removed.iter().collect(),
            Action::Remove { files } => files.iter().collect(),
        }
    }
}

/// A disk's prune: every point with its reason (oldest first), then the actions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunePlan {
    pub points: Vec<PlannedPoint>,
    pub copies: Vec<PlannedPoint>,
    pub actions: Vec<Action>,
}

impl PrunePlan {
    /// Nothing to do: every point is kept.
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Plans the prune of a disk whose chains (oldest first) and copies are given.
pub fn plan(
    chains: &[BackupChain],
    copies: &[BackupFile],
    policy: &KeepPolicy,
    zone: Zone,
) -> PrunePlan {
    let files: Vec<&BackupFile> = chains.iter().flat_map(|c| c.files()).collect();
    let times: Vec<u64> = files.iter().map(|f| f.timestamp).collect();
    let mut reasons: Vec<Reason> = select(&times, policy, zone)
        .into_iter()
        .map(reason)
        .collect();
    if let Some(last) = reasons.last_mut() {
        if !last.is_kept() {
            *last = Reason::Newest;
        }
    }
    let mut actions = Vec::new();
    let mut at = 0;
    for chain in chains {
        let n = chain.incs.len() + 1;
        actions.extend(chain_actions(chain, &reasons[at..at + n]));
        at += n;
    }
    let copy_times: Vec<u64> = copies.iter().map(|f| f.timestamp).collect();
    let copy_reasons: Vec<Reason> = select(&copy_times, policy, zone)
        .into_iter()
        .map(reason)
        .collect();
    let gone: Vec<BackupFile> = copies
        .iter()
        .zip(&copy_reasons)
        .filter(|(_, r)| !r.is_kept())
        .map(|(f, _)| f.clone())
        .collect();
    if !gone.is_empty() {
        actions.push(Action::Remove { files: gone });
    }
    let planned = |fs: Vec<&BackupFile>, rs: &[Reason]| {
        fs.into_iter()
            .zip(rs)
            .map(|(f, &reason)| PlannedPoint {
                file: f.clone(),
                reason,
            })
            .collect()
    };
    PrunePlan {
        points: planned(files, &reasons),
        copies: planned(copies.iter().collect(), &copy_reasons),
        actions,
    }
}

fn reason(v: Verdict) -> Reason {
    match v {
        Verdict::Keep(r) => Reason::Kept(r),
        Verdict::Remove => Reason::NotKept,
    }
}

/// The actions for one chain whose points (FULL first) have `reasons`.
fn chain_actions(chain: &BackupChain, reasons: &[Reason]) -> Vec<Action> {
    let points = chain.files();
    let kept: Vec<usize> = (0..points.len())
        .filter(|&i| reasons[i].is_kept())
        .collect();
    let Some((&first, &last)) = kept.first().zip(kept.last()) else {
        return vec![Action::Remove {
            files: points.into_iter().cloned().collect(),
        }];
    };
    let mut actions = Vec::new();
    if first > 0 {
        let new_point = points[first];
        actions.push(Action::FoldIntoFull {
            full: chain.full.clone(),
            incs: points[1..=first].iter().map(|&f| f.clone()).collect(),
            renamed_to: backup_file_name(
                BackupLevel::Full,
                Some(new_point.timestamp),
                new_point.disk_part(),
            ),
        });
    }
    for pair in kept.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b > a + 1 {
            actions.push(Action::FoldIntoNext {
                removed: points[a + 1..b].iter().map(|&f| f.clone()).collect(),
                into: points[b].clone(),
            });
        }
    }
    if last + 1 < points.len() {
        actions.push(Action::Remove {
            files: points[last + 1..].iter().map(|&f| f.clone()).collect(),
        });
    }
    actions
}

#[cfg(test)]
mod tests;
