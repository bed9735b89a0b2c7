//! Which backup points a keep-policy keeps, exactly as Proxmox Backup Server and borg
//! decide it (`../shared/docs/retention.md`):
//!
//! - points newest first; rules in the order last, hourly, daily, weekly, monthly, yearly;
//! - each rule maps a point to a period (last: the point itself; hourly, daily, ISO weekly,
//!   monthly, yearly), in local time (`TZ` honoured) or UTC;
//! - periods of points kept by earlier rules are already covered: a rule skips points in
//!   them and they do not use up its count;
//! - walking newest to oldest, a point in a new period is kept while the rule has kept fewer
//!   than N periods (the rule stops at the first new period past N); a point in a period the
//!   rule already kept is removed, and no later rule can keep it;
//! - whatever no rule kept is removed.
//!
//! Pure logic over unix times: what a kept or removed point means for the files (folding) is
//! the prune planner's business.

use std::collections::HashSet;

/// A keep rule, in the order rules run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    pub const ORDER: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    /// The option that sets it: `keep-daily`.
    pub fn option(self) -> &'static str {
        match self {
            Rule::Last => "keep-last",
            Rule::Hourly => "keep-hourly",
            Rule::Daily => "keep-daily",
            Rule::Weekly => "keep-weekly",
            Rule::Monthly => "keep-monthly",
            Rule::Yearly => "keep-yearly",
        }
    }
}

/// How many periods each rule keeps; 0 = the rule is not used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    pub fn count(&self, rule: Rule) -> u32 {
        match rule {
            Rule::Last => self.last,
            Rule::Hourly => self.hourly,
            Rule::Daily => self.daily,
            Rule::Weekly => self.weekly,
            Rule::Monthly => self.monthly,
            Rule::Yearly => self.yearly,
        }
    }

    /// No rule keeps anything: a prune with this policy would remove every point.
    pub fn is_empty(&self) -> bool {
        Rule::ORDER.iter().all(|&r| self.count(r) == 0)
    }

    /// `keep-last 2, keep-daily 7`, for plans and messages.
    pub fn describe(&self) -> String {
        Rule::ORDER
            .iter()
            .filter(|&&r| self.count(r) > 0)
            .map(|&r| format!("{} {}", r.option(), self.count(r)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The clock periods are cut by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Zone {
    /// This machine's local time (`TZ` honoured), as PBS and borg use.
    #[default]
    Local,
    Utc,
}

/// What the policy says of one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Kept, by this rule.
    Keep(Rule),
    Remove,
}

impl Verdict {
    pub fn is_kept(self) -> bool {
        matches!(self, Verdict::Keep(_))
    }
}

/// The calendar fields of a time that periods are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    /// ISO 8601 week-numbering year and week (1..=53).
    pub iso_year: i64,
    pub iso_week: u32,
}

/// `time` (unix seconds) in `zone`.
pub fn civil(time: i64, zone: Zone) -> Civil {
    let (year, month, day, hour) = match zone {
        Zone::Utc => utc_fields(time),
        Zone::Local => local_fields(time).unwrap_or_else(|| utc_fields(time)),
    };
    let (iso_year, iso_week) = iso_week(year, month, day);
    Civil {
        year,
        month,
        day,
        hour,
        iso_year,
        iso_week,
    }
}

fn utc_fields(time: i64) -> (i64, u32, u32, u32) {
    let (y, m, d) = crate::humanize::civil_from_days(time.div_euclid(86_400));
    (y, m, d, (time.rem_euclid(86_400) / 3600) as u32)
}

/// Local calendar fields from the C library (which reads `TZ` and the zone database).
#[allow(clippy::unnecessary_cast)]
fn local_fields(time: i64) -> Option<(i64, u32, u32, u32)> {
    extern "C" {
        fn tzset();
    }
    let t = time as libc::time_t; // 64 bits on every target we build for
                                  // SAFETY: tzset only (re)reads TZ; localtime_r writes the struct we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe {
        tzset();
        !libc::localtime_r(&t, &mut tm).is_null()
    };
    ok.then(|| {
        (
            i64::from(tm.tm_year) + 1900,
            (tm.tm_mon + 1) as u32,
            tm.tm_mday as u32,
            tm.tm_hour as u32,
        )
    })
}

/// The ISO 8601 week of a date: weeks start on Monday, and week 1 is the one holding the
/// year's first Thursday (so 1 January may be in week 52 or 53 of the year before).
pub fn iso_week(year: i64, month: u32, day: u32) -> (i64, u32) {
    use crate::humanize::{civil_from_days, days_from_civil};
    let days = days_from_civil(year, month, day);
    // 1970-01-01 was a Thursday: Monday = 0.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (iso_year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(iso_year, 1, 1)) / 7 + 1;
    (iso_year, week as u32)
}

/// The period of `rule` that a point falls in; `index` makes every point its own period
/// for `keep-last`.
fn period(rule: Rule, index: usize, c: &Civil) -> (i64, u32, u32, u32) {
    match rule {
        Rule::Last => (index as i64, 0, 0, 0),
        Rule::Hourly => (c.year, c.month, c.day, c.hour),
        Rule::Daily => (c.year, c.month, c.day, 0),
        Rule::Weekly => (c.iso_year, c.iso_week, 0, 0),
        Rule::Monthly => (c.year, c.month, 0, 0),
        Rule::Yearly => (c.year, 0, 0, 0),
    }
}

/// The verdict for each of `times` (unix seconds, any order; the result is in the same
/// order). Points with equal times are ordered by their position (the later one counts as
/// newer).
pub fn select(times: &[u64], policy: &KeepPolicy, zone: Zone) -> Vec<Verdict> {
    let mut newest_first: Vec<usize> = (0..times.len()).collect();
    newest_first.sort_by(|&a, &b| times[b].cmp(&times[a]).then(b.cmp(&a)));
    let civils: Vec<Civil> = times
        .iter()
        .map(|&t| civil(i64::try_from(t).unwrap_or(i64::MAX), zone))
        .collect();
    let mut marks: Vec<Option<Verdict>> = vec![None; times.len()];
    for rule in Rule::ORDER {
        let keep = policy.count(rule) as usize;
        if keep == 0 {
            continue;
        }
        let period_of = |i: usize| period(rule, i, &civils[i]);
        let covered: HashSet<_> = newest_first
            .iter()
            .filter(|&&i| matches!(marks[i], Some(Verdict::Keep(_))))
            .map(|&i| period_of(i))
            .collect();
        let mut taken = HashSet::new();
        for &i in &newest_first {
            if marks[i].is_some() {
                continue;
            }
            let p = period_of(i);
            if covered.contains(&p) {
                continue;
            }
            if taken.contains(&p) {
                marks[i] = Some(Verdict::Remove);
            } else if taken.len() >= keep {
                break;
            } else {
                taken.insert(p);
                marks[i] = Some(Verdict::Keep(rule));
            }
        }
    }
    marks
        .into_iter()
        .map(|m| m.unwrap_or(Verdict::Remove))
        .collect()
}

#[cfg(test)]
mod tests;

/// The keep options, as `qmprestore prune` and `qmpbackup backup` take them.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct KeepOptions {
    /// Keep the N newest points.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest point of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest point of each of the last N days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest point of each of the last N ISO weeks (Monday to Sunday) that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest point of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest point of each of the last N years that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Cut hours, days, weeks, months and years in UTC, not in local time (TZ).
    #[arg(long)]
    pub utc: bool,
}

impl KeepOptions {
    pub fn policy(&self) -> KeepPolicy {
        KeepPolicy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        }
    }

    pub fn zone(&self) -> Zone {
        if self.utc {
            Zone::Utc
        } else {
            Zone::Local
        }
    }
}
