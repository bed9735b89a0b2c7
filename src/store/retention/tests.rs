use super::*;
use crate::humanize::days_from_civil;

/// `YYYY-MM-DDTHH:MM:SSZ` to unix seconds.
fn t(s: &str) -> u64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let days = days_from_civil(n(0, 4), n(5, 7) as u32, n(8, 10) as u32);
    (days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)) as u64
}

fn policy(f: impl FnOnce(&mut KeepPolicy)) -> KeepPolicy {
    let mut p = KeepPolicy::default();
    f(&mut p);
    p
}

/// The points of `list` (oldest first) that `p` keeps (`kept`) or removes, oldest first,
/// periods in UTC.
fn pick(list: &[&str], p: KeepPolicy, kept: bool) -> Vec<String> {
    let times: Vec<u64> = list.iter().map(|s| t(s)).collect();
    let verdicts = select(&times, &p, Zone::Utc);
    list.iter()
        .zip(verdicts)
        .filter(|(_, v)| v.is_kept() == kept)
        .map(|(s, _)| s.to_string())
        .collect()
}

// The scenarios of Proxmox Backup Server's tests/prune.rs, reproduced.

#[test]
fn pbs_hourly() {
    let list = [
        "2019-11-15T09:39:15Z",
        "2019-11-15T10:49:15Z",
        "2019-11-15T10:59:15Z",
        "2019-11-15T11:39:15Z",
        "2019-11-15T11:49:15Z",
        "2019-11-15T11:59:15Z",
    ];
    assert_eq!(
        pick(&list, policy(|p| p.hourly = 3), false),
        [
            "2019-11-15T10:49:15Z",
            "2019-11-15T11:39:15Z",
            "2019-11-15T11:49:15Z"
        ]
    );
    assert_eq!(
        pick(&list, policy(|p| p.hourly = 2), true),
        ["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]
    );
}

#[test]
fn pbs_simple2() {
    let list = [
        "2018-11-15T11:59:15Z",
        "2019-11-15T11:59:15Z",
        "2019-11-21T11:59:15Z",
        "2019-11-22T11:59:15Z",
        "2019-11-29T11:59:15Z",
        "2019-12-01T11:59:15Z",
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
    ];
    let kept = |p| pick(&list, p, true);
    assert_eq!(kept(policy(|p| p.daily = 1)), ["2019-12-04T11:59:15Z"]);
    assert_eq!(
        kept(policy(|p| {
            p.last = 1;
            p.daily = 1
        })),
        ["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
    assert_eq!(
        kept(policy(|p| {
            p.daily = 1;
            p.weekly = 1
        })),
        ["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
    assert_eq!(
        kept(policy(|p| {
            p.daily = 1;
            p.weekly = 1;
            p.monthly = 1
        })),
        [
            "2019-11-22T11:59:15Z",
            "2019-12-01T11:59:15Z",
            "2019-12-04T11:59:15Z"
        ]
    );
    assert_eq!(
        kept(policy(|p| {
            p.monthly = 1;
            p.yearly = 1
        })),
        ["2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
}

#[test]
fn pbs_simple() {
    let list = [
        "2019-12-02T11:59:15Z",
        "2019-12-03T11:59:15Z",
        "2019-12-04T11:59:15Z",
        "2019-12-04T12:59:15Z",
    ];
    let removed = |p| pick(&list, p, false);
    let none: [&str; 0] = [];
    assert_eq!(removed(policy(|p| p.last = 4)), none);
    assert_eq!(removed(policy(|p| p.last = 3)), ["2019-12-02T11:59:15Z"]);
    assert_eq!(
        removed(policy(|p| p.last = 2)),
        ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z"]
    );
    assert_eq!(removed(policy(|p| p.last = 1)), list[..3]);
    assert_eq!(
        removed(policy(|p| {
            p.last = 2;
            p.daily = 2
        })),
        none
    );
    assert_eq!(removed(policy(|p| p.daily = 3)), ["2019-12-04T11:59:15Z"]);
    assert_eq!(
        removed(policy(|p| p.daily = 2)),
        ["2019-12-02T11:59:15Z", "2019-12-04T11:59:15Z"]
    );
    // All in one week, month and year: one point is kept, whatever the count.
    for p in [
        policy(|p| p.weekly = 5),
        policy(|p| {
            p.daily = 1;
            p.weekly = 5
        }),
        policy(|p| p.monthly = 6),
        policy(|p| p.yearly = 7),
        policy(|p| {
            p.weekly = 5;
            p.monthly = 6;
            p.yearly = 7
        }),
    ] {
        assert_eq!(removed(p), list[..3], "{}", p.describe());
    }
}

/// The worked example of retention.md.
#[test]
fn worked_example() {
    let list = [
        "2026-01-01T01:00:00Z",
        "2026-01-01T13:00:00Z",
        "2026-01-02T01:00:00Z",
        "2026-01-02T13:00:00Z",
        "2026-01-03T01:00:00Z",
        "2026-01-10T01:00:00Z",
        "2026-01-11T01:00:00Z",
    ];
    assert_eq!(
        pick(&list, policy(|p| p.weekly = 2), true),
        [list[4], list[6]]
    );
    let times: Vec<u64> = list.iter().map(|s| t(s)).collect();
    let v = select(
        &times,
        &policy(|p| {
            p.last = 1;
            p.daily = 3
        }),
        Zone::Utc,
    );
    use Verdict::*;
    assert_eq!(
        v,
        [
            Remove,
            Remove,
            Remove,
            Keep(Rule::Daily),
            Keep(Rule::Daily),
            Keep(Rule::Daily),
            Keep(Rule::Last)
        ]
    );
}

#[test]
fn iso_weeks_at_year_ends() {
    // 2026 starts on a Thursday: it has a week 53, which runs into 2027.
    assert_eq!(iso_week(2026, 1, 1), (2026, 1));
    assert_eq!(iso_week(2026, 12, 31), (2026, 53));
    assert_eq!(iso_week(2027, 1, 3), (2026, 53));
    assert_eq!(iso_week(2027, 1, 4), (2027, 1));
    // 1 January in the previous year's week 53 and 52; 29 December in next year's week 1.
    assert_eq!(iso_week(2021, 1, 3), (2020, 53));
    assert_eq!(iso_week(2023, 1, 1), (2022, 52));
    assert_eq!(iso_week(2024, 12, 30), (2025, 1));
    // A week-53 period spans two calendar years: keep-weekly sees one week.
    let list = [
        "2026-12-21T12:00:00Z",
        "2026-12-28T12:00:00Z",
        "2027-01-02T12:00:00Z",
        "2027-01-04T12:00:00Z",
    ];
    assert_eq!(
        pick(&list, policy(|p| p.weekly = 3), true),
        [list[0], list[2], list[3]]
    );
}

#[test]
fn rules_overlap_without_counting_twice() {
    // Daily points over three weeks; the weekly rule skips weeks the daily rule covered.
    let list: Vec<String> = (1..=21)
        .map(|d| format!("2026-06-{d:02}T10:00:00Z"))
        .collect();
    let list: Vec<&str> = list.iter().map(String::as_str).collect();
    let times: Vec<u64> = list.iter().map(|s| t(s)).collect();
    let v = select(
        &times,
        &policy(|p| {
            p.daily = 3;
            p.weekly = 2;
            p.monthly = 5
        }),
        Zone::Utc,
    );
    let kept: Vec<(usize, Rule)> = v
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match v {
            Verdict::Keep(r) => Some((i + 1, *r)),
            Verdict::Remove => None,
        })
        .collect();
    // 19, 20, 21 June by day (21 is a Sunday: ISO week 25 is covered); the weekly rule
    // keeps the Sundays of weeks 24 and 23 (14 and 7 June); June is covered for monthly.
    assert_eq!(
        kept,
        [
            (7, Rule::Weekly),
            (14, Rule::Weekly),
            (19, Rule::Daily),
            (20, Rule::Daily),
            (21, Rule::Daily)
        ]
    );
}

#[test]
fn no_points_one_point_and_no_rules() {
    assert!(select(&[], &policy(|p| p.last = 1), Zone::Utc).is_empty());
    assert_eq!(
        select(&[100], &policy(|p| p.yearly = 1), Zone::Utc),
        [Verdict::Keep(Rule::Yearly)]
    );
    let p = KeepPolicy::default();
    assert!(p.is_empty());
    assert_eq!(select(&[1, 2], &p, Zone::Utc), [Verdict::Remove; 2]);
    assert_eq!(
        policy(|p| {
            p.last = 2;
            p.weekly = 4
        })
        .describe(),
        "keep-last 2, keep-weekly 4"
    );
}

#[test]
fn order_of_the_input_does_not_matter() {
    let times = [
        t("2026-03-01T00:00:00Z"),
        t("2026-01-01T00:00:00Z"),
        t("2026-02-01T00:00:00Z"),
    ];
    let v = select(&times, &policy(|p| p.monthly = 2), Zone::Utc);
    assert_eq!(
        v,
        [
            Verdict::Keep(Rule::Monthly),
            Verdict::Remove,
            Verdict::Keep(Rule::Monthly)
        ]
    );
}

/// Local periods follow `TZ`, across both daylight-saving changes. `TZ` is process-wide,
/// so the checks run in a child process of this test binary with `TZ` set (a POSIX rule
/// for Berlin: no zone database needed).
#[test]
fn local_periods_follow_tz_across_dst() {
    const CHILD: &str = "QMPBACKUP_RETENTION_TZ_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::retention::tests::local_periods_follow_tz_across_dst",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
        return;
    }
    // 22:30 and 23:30 UTC on 28 March 2026 are 23:30 on the 28th and 00:30 on the 29th in
    // Berlin: two local days, one UTC day.
    let evening = [t("2026-03-28T22:30:00Z"), t("2026-03-28T23:30:00Z")];
    let daily = policy(|p| p.daily = 5);
    assert_eq!(
        select(&evening, &daily, Zone::Local),
        [Verdict::Keep(Rule::Daily); 2]
    );
    assert_eq!(
        select(&evening, &daily, Zone::Utc),
        [Verdict::Remove, Verdict::Keep(Rule::Daily)]
    );
    // Spring forward (02:00 CET → 03:00 CEST on 29 March): 00:59:59 and 01:00:00 UTC are
    // 01:59:59 and 03:00:00 local, two hours.
    let spring = [t("2026-03-29T00:59:59Z"), t("2026-03-29T01:00:00Z")];
    let hourly = policy(|p| p.hourly = 5);
    assert_eq!(
        select(&spring, &hourly, Zone::Local),
        [Verdict::Keep(Rule::Hourly); 2]
    );
    assert_eq!(civil(spring[1] as i64, Zone::Local).hour, 3);
    // Fall back (03:00 CEST → 02:00 CET on 25 October): 00:30 and 01:30 UTC are both
    // 02:30 local, one local hour as PBS counts it (two in UTC).
    let autumn = [t("2026-10-25T00:30:00Z"), t("2026-10-25T01:30:00Z")];
    assert_eq!(
        select(&autumn, &hourly, Zone::Local),
        [Verdict::Remove, Verdict::Keep(Rule::Hourly)]
    );
    assert_eq!(
        select(&autumn, &hourly, Zone::Utc),
        [Verdict::Keep(Rule::Hourly); 2]
    );
}
