//! Tidy checks that run with the tests (`cargo test --workspace`): every Rust file opens
//! with a `//!` doc comment, library crates do not print, and the crate graph keeps the
//! layering of ARCHITECTURE.md.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let p = entry.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    rust_files(&p, out);
                }
            } else if name.ends_with(".rs") {
                out.push(p);
            }
        }
    }

    fn root() -> PathBuf {
        crate::project_root()
    }

    #[test]
    fn every_rust_file_has_a_module_doc() {
        let mut files = Vec::new();
        for d in ["crates", "tests", "xtask"] {
            rust_files(&root().join(d), &mut files);
        }
        assert!(files.len() > 20);
        let missing: Vec<_> = files
            .iter()
            .filter(|f| {
                !std::fs::read_to_string(f)
                    .unwrap()
                    .trim_start()
                    .starts_with("//!")
            })
            .collect();
        assert!(
            missing.is_empty(),
            "files without a //! header: {missing:?}"
        );
    }

    #[test]
    fn libraries_do_not_print() {
        let mut files = Vec::new();
        for c in [
            "rankalign-kernels",
            "rankalign-models",
            "rankalign-losses",
            "rankalign-data",
            "rankalign-train",
        ] {
            rust_files(&root().join("crates").join(c).join("src"), &mut files);
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                assert!(
                    !(code.contains("println!(")
                        || code.contains("print!(")
                        || code.contains("dbg!(")),
                    "{}:{}: libraries report through return values and callbacks; only the CLI prints",
                    f.display(),
                    i + 1
                );
            }
        }
    }

    /// Workspace crates named in the `[dependencies]` table of a manifest.
    fn workspace_deps(manifest: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(manifest).unwrap();
        let mut in_deps = false;
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_deps = line == "[dependencies]";
                continue;
            }
            if in_deps && line.starts_with("rankalign-") {
                out.push(line.split(['.', ' ', '=']).next().unwrap().to_string());
            }
        }
        out
    }

    #[test]
    fn crate_layering_holds() {
        let allowed: &[(&str, &[&str])] = &[
            ("rankalign-kernels", &[]),
            ("rankalign-models", &["rankalign-kernels"]),
            ("rankalign-losses", &["rankalign-kernels"]),
            ("rankalign-data", &[]),
            (
                "rankalign-train",
                &[
                    "rankalign-kernels",
                    "rankalign-models",
                    "rankalign-losses",
                    "rankalign-data",
                ],
            ),
            ("rankalign-cli", &["rankalign-train"]),
        ];
        for (krate, ok) in allowed {
            for dep in workspace_deps(&root().join("crates").join(krate).join("Cargo.toml")) {
                assert!(
                    ok.contains(&dep.as_str()),
                    "{krate} must not depend on {dep} (see ARCHITECTURE.md)"
                );
            }
        }
        assert!(
            workspace_deps(&root().join("xtask/Cargo.toml")).is_empty(),
            "xtask links no workspace crate"
        );
    }
}
