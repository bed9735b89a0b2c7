//! qmprestore: native restore of qmpbackup chains (no qemu-img needed).
use clap::Parser;

/// Restore FULL+INC backup chains natively: merge, rebase, commit, snapshotrebase, verify.
///
/// Not implemented yet in this build: this binary only describes itself.
#[derive(Parser)]
#[command(version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!(
        "qmprestore: restore is not implemented in this build yet; use `qcow2 convert` meanwhile"
    );
    std::process::exit(1);
}
