//! Lines of the roles' logs for a failure report: CI keeps only what the
//! suite prints, not `target/tmp/fault-suite/`.

use std::path::Path;

/// Up to `max` lines of the `*.log` files in `dir` for which `wanted` holds,
/// each prefixed with its file. The roles log without colour codes when
/// their output is a file.
pub fn lines(dir: &Path, max: usize, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        for line in text.lines().filter(|l| wanted(l)) {
            if found.len() == max {
                return found;
            }
            found.push(format!("    {name}: {line}"));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_wanted_lines_of_log_files_are_kept() {
        let dir = std::env::temp_dir().join(format!("log-trail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("relay.log"),
            "T  WARN x=1\nT DEBUG y\nT  WARN x=2\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "T WARN ignored\n").unwrap();
        let found = super::lines(&dir, 1, |l| l.contains("WARN"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, vec!["    relay.log: T  WARN x=1".to_owned()]);
    }
}
