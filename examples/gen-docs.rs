//! Writes the man pages (one per command and per subcommand: `qmprestore-merge.1` …) and
//! the bash, zsh and fish completions of the three commands, from their clap definitions.
//! Usage: cargo run --example gen-docs -- OUTDIR   (writes OUTDIR/man1 and
//! OUTDIR/completions/{bash,zsh,fish}; scripts/package runs it).

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::Path;

fn write(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).with_context(|| format!("{}: cannot write", path.display()))
}

/// The exit status of qmpbackup's subcommands other than `backup` (no prune, no exit 3).
const PLAIN_EXIT_CODES: &str = "Exit status: 0 success; 1 failure; 2 usage error.";

/// The page of `cmd` named `name`, and those of its subcommands (`name-sub`). A command's
/// page has the exit status from its --help (clap_mangen renders it); a subcommand's
/// page gets it as an EXIT STATUS section.
fn man_pages(
    cmd: &clap::Command,
    name: &str,
    exit: Option<&str>,
    top_exit: &str,
    dir: &Path,
) -> Result<()> {
    // clap keeps names as &'static str; a generator that ends at once can leak them.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let page = cmd
        .clone()
        .name(leak(name.to_string()))
        .bin_name(leak(name.replace('-', " ")));
    let mut out = Vec::new();
    clap_mangen::Man::new(page.clone()).render(&mut out)?;
    if let Some(exit) = exit {
        // roff: backslashes are escapes and `-` a hyphen; the text starts with a letter,
        // so it is never read as a request.
        let text = exit.replace('\\', "\\\\").replace('-', "\\-");
        out.extend_from_slice(format!(".SH \"EXIT STATUS\"\n{text}\n").as_bytes());
    }
    write(&dir.join(format!("{name}.1")), &out)?;
    for sub in page.get_subcommands().filter(|s| s.get_name() != "help") {
        let sub_name = format!("{name}-{}", sub.get_name());
        let sub_exit = if name == "qmpbackup" && sub_name != "qmpbackup-backup" {
            PLAIN_EXIT_CODES
        } else {
            top_exit
        };
        man_pages(sub, &sub_name, Some(sub_exit), top_exit, dir)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .context("usage: gen-docs OUTDIR")?;
    let out = Path::new(&out);
    let man = out.join("man1");
    std::fs::create_dir_all(&man)?;
    use qmpbackup::cli;
    let commands = [
        (
            "qmpbackup",
            cli::qmpbackup::Cli::command(),
            cli::qmpbackup::EXIT_CODES,
        ),
        (
            "qmprestore",
            cli::qmprestore::Cli::command(),
            cli::qmprestore::EXIT_CODES,
        ),
        ("qcow2", cli::qcow2::Cli::command(), cli::qcow2::EXIT_CODES),
    ];
    for (name, cmd, exit) in &commands {
        let mut cmd = cmd.clone().name(*name);
        cmd.build();
        man_pages(&cmd, name, None, exit, &man)?;
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.to_string()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let dir = out.join("completions").join(dir);
            std::fs::create_dir_all(&dir)?;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), *name, &mut buf);
            write(&dir.join(file), &buf)?;
        }
    }
    Ok(())
}
