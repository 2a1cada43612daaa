//! Where the servers' files go: build artefacts under `target/infra`, kept;
//! run directories under `target/tmp`, thrown away.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The repository root: the pom and the Go module live in it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/<name> has a grandparent")
        .to_owned()
}

/// The cargo target directory of the running binary (tests run from
/// `target/<profile>/deps`), else `$CARGO_TARGET_DIR`, else `<root>/target`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|d| d.file_name().is_some_and(|n| n == "target"))
                .map(Path::to_owned)
        })
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Fetched jars and built binaries, kept between runs.
pub fn infra_dir() -> PathBuf {
    target_dir().join("infra")
}

/// Run directories of servers, deleted when they stop.
pub fn tmp_dir() -> PathBuf {
    target_dir().join("tmp")
}

/// Makes `dir` once: `build` fills a scratch directory, which is renamed into
/// place, so a build cut off halfway is never mistaken for a finished one.
/// Concurrent test binaries wait on a file lock instead of building twice.
pub(crate) fn build_once(dir: &Path, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().expect("a cache entry has a parent");
    std::fs::create_dir_all(parent)?;
    let lock = File::create(parent.join(".lock"))?;
    lock.lock()?;
    if dir.is_dir() {
        return Ok(());
    }
    let scratch = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(parent)?;
    build(scratch.path())?;
    std::fs::rename(scratch.keep(), dir)?;
    Ok(())
}

/// Runs a fetch or build step, failing with the end of its output.
pub(crate) fn run(step: &str, command: &mut Command) -> Result<()> {
    let out = command.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Missing {
            program: command.get_program().to_string_lossy().into_owned(),
            hint: "run ./scripts/test once, which installs what the tests need",
        },
        _ => Error::Io(e),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    Err(Error::Prepare {
        step: step.to_owned(),
        detail: format!("{}: {}", out.status, tail(&text, 20)),
    })
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
