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

/// The page of `cmd` named `name`, and those of its subcommands (`name-sub`), each with an
/// EXIT STATUS section.
fn man_pages(cmd: &clap::Command, name: &str, exit: &str, dir: &Path) -> Result<()> {
    // clap keeps names as &'static str; a generator that ends at once can leak them.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let page = cmd
        .clone()
        .name(leak(name.to_string()))
        .bin_name(leak(name.replace('-', " ")));
    let mut out = Vec::new();
    clap_mangen::Man::new(page.clone()).render(&mut out)?;
    // roff: backslashes are escapes and `-` a hyphen; the text starts with a letter, so it
    // is never read as a request.
    let text = exit.replace('\\', "\\\\").replace('-', "\\-");
    out.extend_from_slice(format!(".SH \"EXIT STATUS\"\n{text}\n").as_bytes());
    write(&dir.join(format!("{name}.1")), &out)?;
    for sub in page.get_subcommands().filter(|s| s.get_name() != "help") {
        man_pages(sub, &format!("{name}-{}", sub.get_name()), exit, dir)?;
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
        man_pages(&cmd, name, exit, &man)?;
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
