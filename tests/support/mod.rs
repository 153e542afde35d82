//! Helpers shared by the integration tests: run the built `mongo-syncd` binary.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The binary cargo built for these tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mongo-syncd"))
}

/// What a finished run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs the binary with `args` and only the given `MONGO_SYNCD_*` variables: the test
/// process's own `MONGO_SYNCD_*` and `RUST_LOG` variables are removed so results do not depend
/// on the developer's shell.
pub fn run_with_env(args: &[&str], env: &[(&str, &str)], dir: Option<&Path>) -> Run {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MONGO_SYNCD_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd.envs(env.iter().copied());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary().display()))
        .into()
}

/// Runs the binary with `args` and a clean `MONGO_SYNCD_*` environment.
pub fn run(args: &[&str]) -> Run {
    run_with_env(args, &[], None)
}

/// Writes `contents` to `name` inside `dir` and returns the path.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

pub mod cluster;
pub mod isolated;
pub mod ports;
pub mod workload;
