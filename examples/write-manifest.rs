//! Writes a version-2 checksum manifest beside each image named on the command line, as
//! qmpbackup does after a backup: for benchmarks and experiments on hand-made chains.
//! Usage: cargo run --release --example write-manifest -- FILE...

fn main() -> anyhow::Result<()> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        anyhow::bail!("usage: write-manifest FILE...");
    }
    for f in files {
        let m = qmpbackup::store::manifest::write_manifest(std::path::Path::new(&f), None)?;
        eprintln!("{f}: {} runs", m.runs.len());
    }
    Ok(())
}
