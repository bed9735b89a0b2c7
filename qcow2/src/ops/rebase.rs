//! `rebase`: change an image's backing file, safely (content preserved by copying what
//! reads differently) or unsafely (`-u`: the reference only).

use crate::chain::{as_backing, open_backing_of, probe_format, Chain, Format, OpenOptions};
use crate::error::{Error, Result};
use crate::image::write::OpenRwOptions;
use crate::image::{resolve_relative, Qcow2};
use crate::mapping::ExtentKind;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// New backing file name as it will be stored ("" removes the backing file).
    pub backing: String,
    /// Its format (probed when None and the file exists).
    pub format: Option<Format>,
    /// Change only the reference.
    pub unsafe_mode: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RebaseStats {
    pub bytes_copied: u64,
}

pub fn rebase(path: &Path, opts: &RebaseOptions) -> Result<RebaseStats> {
    let display = path.display().to_string();
    let mut img = Qcow2::open_rw(path, OpenRwOptions::default())?;
    let new_name = (!opts.backing.is_empty()).then(|| opts.backing.clone());
    let new_path = new_name
        .as_ref()
        .map(|n| resolve_relative(path.parent(), n));
    let new_format = match (&new_path, opts.format) {
        (None, _) => None,
        (Some(_), Some(f)) => Some(f),
        (Some(p), None) => Some(probe_format(p).map_err(|_| {
            Error::bad_request(format!(
                "Could not change the backing file to '{}': backing format must be specified (-F)",
                opts.backing
            ))
        })?),
    };
    let mut stats = RebaseStats::default();
    if !opts.unsafe_mode {
        let old = open_backing_of(&img)?;
        let new = match &new_path {
            Some(p) => Some(Chain::open(
                p,
                &OpenOptions {
                    format: new_format,
                    no_backing: false,
                },
            )?),
            None => None,
        };
        stats.bytes_copied = copy_differences(&mut img, old.as_ref(), new.as_ref())?;
    }
    let fmt_name = new_format.map(|f| f.name().to_string());
    img.header_mut().set_backing(new_name, fmt_name);
    img.mark_header_dirty()?;
    img.flush().map_err(|e| match e {
        Error::Invalid { msg, .. } => Error::invalid(
            &display,
            format!("cannot store the new backing file name: {msg}"),
        ),
        other => other,
    })?;
    Ok(stats)
}

/// Copies into `img`, cluster by cluster, whatever reads differently through the old and the
/// new backing in ranges the image does not allocate itself.
fn copy_differences(img: &mut Qcow2, old: Option<&Chain>, new: Option<&Chain>) -> Result<u64> {
    let (old, new) = (as_backing(old), as_backing(new));
    let cs = img.cluster_size();
    let size = img.virtual_size();
    let mut a = vec![0u8; cs as usize];
    let mut b = vec![0u8; cs as usize];
    let mut copied = 0;
    let mut off = 0;
    while off < size {
        let n = cs.min(size - off);
        // Skip clusters fully allocated in the image itself.
        let mut pos = off;
        let mut has_unallocated = false;
        while pos < off + n {
            let (len, kind) = img.block_status(pos, off + n - pos)?;
            if kind == ExtentKind::Unallocated {
                has_unallocated = true;
                break;
            }
            pos += len;
        }
        if has_unallocated {
            let (a, b) = (&mut a[..n as usize], &mut b[..n as usize]);
            img.read_view(a, off, old)?;
            img.read_view(b, off, new)?;
            if a != b {
                img.write_at(a, off, old)?;
                copied += n;
            }
        }
        off += n;
    }
    Ok(copied)
}
