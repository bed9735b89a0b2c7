//! The chain's uuid: it names the dirty bitmap (`qmpbackup-<uuid>`) that the chain's INCs
//! are taken from, and is kept in the `uuid` file of the chain root.

use crate::fsutil::Dir;
use crate::store::name::UUID_FILE;
use anyhow::{bail, Context, Result};

/// The largest uuid file we read: a uuid is 36 bytes.
const MAX_UUID_FILE: u64 = 4096;

/// Checks a chain uuid (from `--uuid` or the uuid file): it becomes part of a bitmap name.
pub fn check_uuid(uuid: &str) -> Result<()> {
    if uuid.is_empty()
        || uuid.len() > 64
        || !uuid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!(
            "invalid chain uuid {uuid:?}: use 1 to 64 letters, digits, '-' or '_' (a uuid such as 3f1c…-…)"
        );
    }
    Ok(())
}

/// A new random (version 4) uuid for a new chain.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The bitmap a chain's INCs are taken from.
pub fn bitmap_name(uuid: &str) -> String {
    format!("qmpbackup-{uuid}")
}

/// The uuid in the chain root `root`; None when there is no uuid file (or an empty one).
pub fn read_uuid(root: &Dir) -> Result<Option<String>> {
    let path = root.join(UUID_FILE);
    let read = root
        .read_small(UUID_FILE, MAX_UUID_FILE)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let Some(bytes) = read else { return Ok(None) };
    let text = String::from_utf8_lossy(&bytes);
    let uuid = text.trim();
    if uuid.is_empty() {
        return Ok(None);
    }
    check_uuid(uuid).with_context(|| {
        format!(
            "{}: does not hold a chain uuid; remove it to start a new chain",
            path.display()
        )
    })?;
    Ok(Some(uuid.to_string()))
}

/// Writes (atomically) the uuid file of the chain root `root`.
pub fn write_uuid(root: &Dir, uuid: &str) -> Result<()> {
    root.write_atomic(UUID_FILE, format!("{uuid}\n").as_bytes())
        .with_context(|| format!("{}: cannot write", root.join(UUID_FILE).display()))
}

#[cfg(test)]
mod tests {
    use crate::fsutil::Dir;
    use crate::store::uuid::*;

    #[test]
    fn new_uuids_are_valid_and_differ() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        for u in [&a, &b] {
            check_uuid(u).unwrap();
            assert_eq!(u.len(), 36);
            assert_eq!(&u[14..15], "4", "version 4: {u}");
        }
        assert_eq!(bitmap_name("x-1"), "qmpbackup-x-1");
    }

    #[test]
    fn bad_uuids_are_refused() {
        let long = "a".repeat(65);
        for u in ["", "a b", "a/b", "ü", "a\n", long.as_str()] {
            assert!(check_uuid(u).is_err(), "{u:?}");
        }
        check_uuid(&"a".repeat(64)).unwrap();
        check_uuid("my_chain-1").unwrap();
    }

    #[test]
    fn uuid_file_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open(tmp.path()).unwrap();
        assert_eq!(read_uuid(&root).unwrap(), None);
        write_uuid(&root, "abc-123").unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("uuid")).unwrap(),
            "abc-123\n"
        );
        assert_eq!(read_uuid(&root).unwrap().as_deref(), Some("abc-123"));
        std::fs::write(tmp.path().join("uuid"), "  \n").unwrap();
        assert_eq!(read_uuid(&root).unwrap(), None);
    }

    #[test]
    fn a_uuid_file_without_a_uuid_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("uuid"), "../../etc\n").unwrap();
        let e = format!("{:#}", read_uuid(&root).unwrap_err());
        assert!(e.contains("does not hold a chain uuid"), "{e}");
        std::fs::write(tmp.path().join("uuid"), vec![b'a'; 5000]).unwrap();
        assert!(read_uuid(&root).is_err());
    }
}
