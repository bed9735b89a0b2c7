//! qmpbackup: live full, incremental, auto and copy backups of running QEMU VMs over QMP.
use clap::Parser;

/// Live full, incremental, auto and copy backups of running QEMU VMs over QMP.
///
/// Not implemented yet in this build: this binary only describes itself.
#[derive(Parser)]
#[command(version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("qmpbackup: backups are not implemented in this build yet; see README.md");
    std::process::exit(1);
}
