use super::*;
use std::path::Path;

const DAY: u64 = 86_400;
/// 2026-01-05 00:00 UTC, a Monday.
const T0: u64 = 1_767_571_200;

fn file(level: BackupLevel, t: u64) -> BackupFile {
    let name = backup_file_name(level, Some(t), "d.qcow2");
    BackupFile::parse(&Path::new("/b/d").join(name)).unwrap()
}

/// A chain with a point a day from `first_day` (relative to T0), FULL first.
fn chain(first_day: u64, points: usize) -> BackupChain {
    BackupChain {
        full: file(BackupLevel::Full, T0 + first_day * DAY),
        incs: (1..points as u64)
            .map(|k| file(BackupLevel::Inc, T0 + (first_day + k) * DAY))
            .collect(),
    }
}

fn names(fs: &[BackupFile]) -> Vec<String> {
    fs.iter().map(day_of).collect()
}

/// `F3` / `I5`: level and day number, for compact expectations.
fn day_of(f: &BackupFile) -> String {
    let l = if f.level == BackupLevel::Full {
        "F"
    } else {
        "I"
    };
    format!("{l}{}", (f.timestamp - T0) / DAY)
}

fn daily(n: u32) -> KeepPolicy {
    KeepPolicy {
        daily: n,
        ..Default::default()
    }
}

fn kept(p: &PrunePlan) -> Vec<String> {
    p.points
        .iter()
        .filter(|p| p.reason.is_kept())
        .map(|p| day_of(&p.file))
        .collect()
}

#[test]
fn everything_kept_is_a_noop() {
    let p = plan(&[chain(0, 5)], &[], &daily(10), Zone::Utc);
    assert!(p.is_noop());
    assert_eq!(kept(&p), ["F0", "I1", "I2", "I3", "I4"]);
}

#[test]
fn the_fulls_point_removed_commits_into_the_full_and_renames_it() {
    // Days 0..6, keep 3 daily: I4, I5, I6 kept; F0..I3 fold into the FULL as I4's point.
    let p = plan(&[chain(0, 7)], &[], &daily(3), Zone::Utc);
    assert_eq!(kept(&p), ["I4", "I5", "I6"]);
    let [Action::FoldIntoFull {
        full,
        incs,
        renamed_to,
    }] = &p.actions[..]
    else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(day_of(full), "F0");
    assert_eq!(names(incs), ["I1", "I2", "I3", "I4"]);
    assert_eq!(renamed_to, &format!("FULL-{}-d.qcow2", T0 + 4 * DAY));
}

#[test]
fn middle_points_fold_into_the_next_kept_point() {
    // Two ISO weeks of daily points, Monday T0 to Sunday day 13.
    let policy = KeepPolicy {
        last: 1,
        weekly: 2,
        ..Default::default()
    };
    let p = plan(&[chain(0, 14)], &[], &policy, Zone::Utc);
    // last: I13; weekly skips week 2 (covered by I13) and keeps week 1's newest, I6; then
    // no earlier week exists. F0..I5 fold into the FULL; I7..I12 fold into I13.
    assert_eq!(kept(&p), ["I6", "I13"]);
    assert_eq!(p.actions.len(), 2);
    let Action::FoldIntoFull { incs, .. } = &p.actions[0] else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(incs.len(), 6);
    let Action::FoldIntoNext { removed, into } = &p.actions[1] else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(names(removed), ["I7", "I8", "I9", "I10", "I11", "I12"]);
    assert_eq!(day_of(into), "I13");
    assert_eq!(
        p.actions.iter().flat_map(|a| a.removed_files()).count(),
        12,
        "every removed INC file goes once"
    );
}

#[test]
fn a_chain_with_nothing_kept_goes_whole_and_an_older_tail_goes() {
    // Three chains of 3 points: days 0-2, 10-12, 20-22. keep-daily 4 keeps 22, 21, 20, 12.
    let chains = [chain(0, 3), chain(10, 3), chain(20, 3)];
    let p = plan(&chains, &[], &daily(4), Zone::Utc);
    assert_eq!(kept(&p), ["I12", "F20", "I21", "I22"]);
    assert_eq!(
        p.actions,
        [
            Action::Remove {
                files: chains[0].files().into_iter().cloned().collect()
            },
            Action::FoldIntoFull {
                full: chains[1].full.clone(),
                incs: chains[1].incs.clone(),
                renamed_to: format!("FULL-{}-d.qcow2", T0 + 12 * DAY),
            },
        ]
    );
    // All in one month: keep-monthly 1 keeps the newest point only.
    let p = plan(
        &chains,
        &[],
        &KeepPolicy {
            monthly: 1,
            ..Default::default()
        },
        Zone::Utc,
    );
    assert_eq!(kept(&p), ["I22"]);
}

#[test]
fn the_newest_point_is_kept_whatever_the_policy() {
    // A rule that keeps the newest point says so.
    let chains = [chain(0, 3)];
    let p = plan(&chains, &[], &daily(1), Zone::Utc);
    assert_eq!(kept(&p), ["I2"]);
    assert_eq!(p.points[2].reason, Reason::Kept(Rule::Daily));
    // Two points in the same hour: hourly keeps the newer; the FULL goes into the newest.
    let same_hour = BackupChain {
        full: file(BackupLevel::Full, T0),
        incs: vec![file(BackupLevel::Inc, T0 + 60)],
    };
    let p = plan(
        &[same_hour],
        &[],
        &KeepPolicy {
            hourly: 1,
            ..Default::default()
        },
        Zone::Utc,
    );
    assert_eq!(p.points[1].reason, Reason::Kept(Rule::Hourly));
    assert_eq!(p.points[0].reason, Reason::NotKept);
    // No rule at all (the command refuses that; the planner still keeps the newest).
    let p = plan(&chains, &[], &KeepPolicy::default(), Zone::Utc);
    assert_eq!(p.points[2].reason, Reason::Newest);
    assert!(!p.points[0].reason.is_kept());
}

#[test]
fn copies_are_a_timeline_of_their_own() {
    let copies: Vec<BackupFile> = (0..4)
        .map(|d| file(BackupLevel::Copy, T0 + d * DAY + 3600))
        .collect();
    let p = plan(&[chain(0, 4)], &copies, &daily(2), Zone::Utc);
    // The chain: I2, I3 kept (the copies of days 2, 3 do not use up the count).
    assert_eq!(kept(&p), ["I2", "I3"]);
    let Some(Action::Remove { files }) = p.actions.last() else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(files, &copies[..2]);
    assert_eq!(p.copies.iter().filter(|c| c.reason.is_kept()).count(), 2);
}

#[test]
fn the_plan_serialises_with_rule_names() {
    let p = plan(&[chain(0, 3)], &[], &daily(2), Zone::Utc);
    let v = serde_json::to_value(&p).unwrap();
    assert_eq!(
        v["points"][2]["reason"],
        serde_json::json!({"kept": "keep-daily"})
    );
    assert_eq!(v["points"][0]["reason"], "not-kept");
    assert_eq!(v["actions"][0]["action"], "fold-into-full");
}
