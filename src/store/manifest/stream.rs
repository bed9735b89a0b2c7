//! Streaming deserialisation of a manifest: the header's fields are kept, the runs checked
//! and handed one by one to a callback, so memory does not grow with the manifest.

use crate::store::level::BackupLevel;
use crate::store::manifest::runs::{misplaced, CheckedRun, BLOCK_SIZES};
use crate::store::manifest::{ManifestHeader, Origin, FORMAT};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

pub type OnRun<'a> = &'a mut dyn FnMut(CheckedRun) -> Result<(), ()>;

pub struct HeaderSeed<'a> {
    pub on_run: OnRun<'a>,
}

impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = ManifestHeader;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ManifestHeader, D::Error> {
        d.deserialize_map(self)
    }
}

/// Why the header read so far cannot describe runs; None when it can.
fn header_problem(h: &ManifestHeader, seen_size: bool) -> Option<String> {
    if h.format != FORMAT || !(1..=2).contains(&h.version) {
        return Some(format!(
            "format {:?} version {}, expected {FORMAT:?} version 1 or 2",
            h.format, h.version
        ));
    }
    if !seen_size {
        return Some("no virtual-size before the runs".into());
    }
    if !BLOCK_SIZES.contains(&h.block_size) || !h.block_size.is_power_of_two() {
        return Some(format!(
            "block size {} is not a power of two from 512 bytes to 64 MiB",
            h.block_size
        ));
    }
    None
}

impl<'de> Visitor<'de> for HeaderSeed<'_> {
    type Value = ManifestHeader;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a manifest object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ManifestHeader, A::Error> {
        let mut h = ManifestHeader::default();
        let mut seen_size = false;
        let mut seen_runs = false;
        let (mut level, mut time) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "format" => h.format = map.next_value()?,
                "version" => h.version = map.next_value()?,
                "file" => h.file = map.next_value()?,
                "virtual-size" => {
                    h.virtual_size = map.next_value()?;
                    seen_size = true;
                }
                "run-size" | "block-size" => h.block_size = map.next_value()?,
                "uuid" => h.uuid = map.next_value()?,
                "level" => level = Some(map.next_value::<String>()?),
                "time" => time = Some(map.next_value::<u64>()?),
                "runs" => {
                    if let Some(p) = header_problem(&h, seen_size) {
                        return Err(de::Error::custom(p));
                    }
                    seen_runs = true;
                    map.next_value_seed(RunsSeed {
                        on_run: &mut *self.on_run,
                        size: h.virtual_size,
                        block: h.block_size,
                    })?
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let Some(p) = header_problem(&h, seen_size) {
            return Err(de::Error::custom(p));
        }
        if !seen_runs {
            return Err(de::Error::missing_field("runs"));
        }
        h.origin = match (level, time) {
            (None, None) => None,
            (Some(l), Some(time)) => match BackupLevel::from_prefix(&l) {
                Some(level) => Some(Origin { level, time }),
                None => return Err(de::Error::custom(format!("unknown level {l:?}"))),
            },
            _ => return Err(de::Error::custom("level and time go together")),
        };
        Ok(h)
    }
}

struct RunsSeed<'a> {
    on_run: OnRun<'a>,
    size: u64,
    block: u64,
}

impl<'de> DeserializeSeed<'de> for RunsSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RunsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of [start, length, crc32] runs")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut prev_end = 0;
        while let Some(run) = seq.next_element::<CheckedRun>()? {
            if let Some(p) = misplaced(&run, prev_end, self.size, self.block) {
                return Err(de::Error::custom(p));
            }
            prev_end = run.end();
            if (self.on_run)(run).is_err() {
                return Err(de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}
