//! `cargo xtask <task>`: the project's automation, in Rust so that it runs wherever cargo does.

#![allow(clippy::print_stdout, clippy::print_stderr)] // xtask talks to a person on the terminal

mod codegen;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  codegen [--check]   regenerate crates/fleetlink-proto/src/gen from proto/ (--check: fail if stale)
  test [--slow]       the full gate: fmt, clippy -D warnings, codegen --check, every Rust test,
                      then the Python bindings built into target/pyvenv and tested with pytest
                      (--slow: also the large-fleet and soak tests)
  bench [--quick] [ARGS...]
                      the benchmarks side by side with Mosquitto, NATS and a raw quinn sink:
                      criterion micro-benchmarks, then every scenario (release build); writes
                      docs/benchmarks.md and docs/benchmarks.json. ARGS go to `fleetlink-bench run`
                      (e.g. --only flood,slow --runs 5 --idle-sizes 10000). --quick: a short smoke
                      run (dev build, tiny loads) written under target/bench-quick; fleetlink-bench's test runs it.
                      --python: also Client.telemetry vs pandas.read_sql on 1M and 10M rows
                      (release build of the bindings in target/pyvenv; adds several minutes)
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
        Some("bench") => bench(&root, &args[1..]),
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
    // The Python extension is tested through Python (below); the criterion benches only run
    // under `cargo xtask bench`. fleetlink-bench's own test runs the quick benchmark.
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "fleetlink-python",
        "--exclude",
        "fleetlink-microbench",
    ];
    if slow {
        args.extend(["--features", "fleetlink-server/slow-tests"]);
    }
    cargo(root, &args, env)?;
    python_tests(root)?;
    step("all checks passed");
    Ok(())
}

/// `cargo xtask bench [--quick] [ARGS...]`.
fn bench(root: &Path, args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let python = args.iter().any(|a| a == "--python");
    let rest: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--quick" && *a != "--python")
        .collect();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    if quick {
        step("bench --quick: the harness on tiny loads (dev build)");
        cargo(root, &["build", "--package", "fleetlink-bench"], &[])?;
        let out = target.join("bench-quick");
        let json = out.join("benchmarks.json");
        run(
            Command::new(target.join("debug").join("fleetlink-bench"))
                .args(["run", "--quick", "--check"])
                .arg("--md")
                .arg(out.join("benchmarks.md"))
                .arg("--json")
                .arg(&json)
                .args(["--command-line", "cargo xtask bench --quick"])
                .args(&rest)
                .current_dir(root),
            "the quick benchmark run",
        )?;
        eprintln!("quick report: {}", out.join("benchmarks.md").display());
        return Ok(());
    }
    step("bench: criterion micro-benchmarks");
    cargo(
        root,
        &[
            "bench",
            "--package",
            "fleetlink-microbench",
            "--bench",
            "micro",
        ],
        &[],
    )?;
    let mut python_json = Vec::new();
    if python {
        step("bench: Python, Client.telemetry vs pandas.read_sql (release build of the bindings)");
        let venv = python_env(root, true)?;
        for rows in ["1000000", "10000000"] {
            let out = target.join(format!("bench-python-{rows}.json"));
            run(
                Command::new(venv.join("bin").join("python"))
                    .args([
                        "bench/telemetry_bench.py",
                        "--rows",
                        rows,
                        "--runs",
                        "5",
                        "--json",
                    ])
                    .arg(&out)
                    .current_dir(root.join("bindings").join("python"))
                    .env("VIRTUAL_ENV", &venv)
                    .env("PATH", path_with(&venv.join("bin"))),
                "the Python telemetry benchmark",
            )?;
            python_json.push(out);
        }
    }
    step("bench: the scenarios (release build)");
    cargo(
        root,
        &["build", "--release", "--package", "fleetlink-bench"],
        &[],
    )?;
    let mut command_line = "cargo xtask bench".to_owned();
    for a in args {
        command_line.push(' ');
        command_line.push_str(a);
    }
    let mut cmd = Command::new(target.join("release").join("fleetlink-bench"));
    cmd.arg("run")
        .arg("--criterion")
        .arg(target.join("criterion"))
        .args(["--command-line", &command_line]);
    for j in &python_json {
        cmd.arg("--python-json").arg(j);
    }
    run(cmd.args(&rest).current_dir(root), "the benchmark run")
}

/// Python packages the bindings' tests need (the extension itself is built by maturin).
const PYTHON_TEST_PACKAGES: &[&str] = &[
    "maturin>=1.9,<2",
    "pytest>=8",
    "pytest-timeout>=2",
    "pyarrow>=14",
    "polars>=1",
    "pandas>=2",
];

/// The virtualenv target/pyvenv with the test packages and the extension built into it
/// (`release`: optimised, for benchmarks). Returns its directory.
fn python_env(root: &Path, release: bool) -> Result<PathBuf> {
    let venv = root.join("target").join("pyvenv");
    let bin = venv.join("bin");
    if !bin.join("python").exists() {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(
            Command::new(&python).args(["-m", "venv"]).arg(&venv),
            "creating the virtualenv",
        )?;
    }
    run(
        Command::new(bin.join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PYTHON_TEST_PACKAGES),
        "installing the Python test packages",
    )?;
    let bindings = root.join("bindings").join("python");
    let mut maturin = Command::new(bin.join("maturin"));
    maturin.arg("develop");
    if release {
        maturin.arg("--release");
    }
    run(
        maturin
            .current_dir(&bindings)
            .env("VIRTUAL_ENV", &venv)
            .env("PATH", path_with(&bin)),
        "building the extension (maturin develop)",
    )?;
    Ok(venv)
}

/// Builds the Python extension into a virtualenv under target/ and runs its tests strictly.
fn python_tests(root: &Path) -> Result<()> {
    step("python: virtualenv target/pyvenv, maturin develop, pytest");
    let venv = python_env(root, false)?;
    let bin = venv.join("bin");
    run(
        Command::new(bin.join("python"))
            .args(["-m", "pytest", "-q"])
            .current_dir(root.join("bindings").join("python"))
            .env("VIRTUAL_ENV", &venv)
            .env("PATH", path_with(&bin)),
        "the Python tests",
    )
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
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
