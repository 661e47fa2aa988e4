//! `cargo xtask <task>`: the project's automation, in Rust so that it runs wherever cargo does.

#![allow(clippy::print_stdout, clippy::print_stderr)] // xtask talks to a person on the terminal

mod codegen;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  codegen [--check]   regenerate crates/fleetlink-proto/src/gen from proto/ (--check: fail if stale)
  test [--slow]       the full gate: fmt, clippy -D warnings, codegen --check, every test
                      (--slow: also the large-fleet and soak tests)
  demo [ARGS...]      run a server with a simulated fleet on embedded storage (`fleetlink demo`)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("codegen") => {
            let check = args.iter().any(|a| a == "--check");
            codegen::run(&root, check)?;
            if !check {
                println!("generated code written to crates/fleetlink-proto/src/gen");
            }
            Ok(())
        }
        Some("test") => test(&root, args.iter().any(|a| a == "--slow")),
        Some("demo") => cargo(
            &root,
            &[
                &[
                    "run",
                    "--release",
                    "--package",
                    "fleetlink-cli",
                    "--",
                    "demo",
                ][..],
                &strs(&args[1..]),
            ]
            .concat(),
            &[],
        ),
        Some("help" | "--help" | "-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n\n{USAGE}"),
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn test(root: &Path, slow: bool) -> Result<()> {
    step("cargo fmt --check");
    cargo(root, &["fmt", "--all", "--check"], &[])?;
    step("cargo clippy --all-targets -- -D warnings");
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    step("cargo xtask codegen --check");
    codegen::run(root, true)?;
    step(if slow {
        "cargo test (with slow tests)"
    } else {
        "cargo test"
    });
    let env: &[(&str, &str)] = if slow {
        &[("FLEETLINK_SLOW_TESTS", "1")]
    } else {
        &[]
    };
    let mut args = vec!["test", "--workspace"];
    if slow {
        args.extend(["--features", "fleetlink-server/slow-tests"]);
    }
    cargo(root, &args, env)?;
    step("all checks passed");
    Ok(())
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}

fn cargo(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
