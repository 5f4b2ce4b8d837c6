//! The Rust types and `schemas/` never drift.
//!
//! Regenerates every schema and the index from the types and compares them
//! with the files. After a deliberate contract change, rewrite the files with
//! `SKEIN_BLESS_SCHEMAS=1 cargo nextest run -p skein-contracts` and review
//! the diff (a breaking change needs a new version instead). The schema of
//! a version a type has moved past stays in `schemas/` as history: readers
//! still upcast from it, and blessing never removes it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn pretty(value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// `<name>.v<k>.json` and a version `<name>.v<n>.json` (n > k) among
/// `known`: the schema of a version the type no longer is, which readers
/// still upcast from (a year of stored events): history, kept as it is and
/// never removed by blessing.
fn superseded(path: &Path, known: &std::collections::HashSet<PathBuf>) -> bool {
    let Some((base, version)) = versioned(path) else {
        return false;
    };
    known
        .iter()
        .any(|k| versioned(k).is_some_and(|(other, newer)| other == base && newer > version))
}

/// `dir/name.reply` and 3 of `dir/name.reply.v3.json`.
fn versioned(path: &Path) -> Option<(PathBuf, u32)> {
    let stem = path.to_str()?.strip_suffix(".json")?;
    let (base, version) = stem.rsplit_once(".v")?;
    Some((
        PathBuf::from(base),
        version.parse().ok().filter(|v| *v > 0)?,
    ))
}

#[test]
fn an_older_version_s_schema_is_history_not_drift() {
    let known: std::collections::HashSet<PathBuf> = [
        "s/orders/order_placed.v2.json",
        "s/orders/get_order.reply.v1.json",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    let kept = |p: &str| superseded(Path::new(p), &known);
    assert!(kept("s/orders/order_placed.v1.json"));
    assert!(!kept("s/orders/order_placed.v2.json"));
    assert!(!kept("s/orders/order_placed.v3.json"));
    assert!(!kept("s/orders/order_placed_old.v1.json"));
    assert!(!kept("s/orders/get_order.v1.json"));
    assert!(!kept("s/orders/get_order.reply.v0.json"));
}

#[test]
fn schemas_match_the_types() -> anyhow::Result<()> {
    let dir = schemas_dir();
    let bless = std::env::var("SKEIN_BLESS_SCHEMAS").is_ok_and(|v| v == "1");
    let mut expected = vec![
        (
            "index.json".to_owned(),
            pretty(&skein_contracts::registry::index())?,
        ),
        (
            "README.md".to_owned(),
            skein_contracts::registry::markdown(),
        ),
    ];
    for entry in skein_contracts::registry::all() {
        expected.push((entry.file.clone(), pretty(&entry.schema)?));
    }
    let mut drift = Vec::new();
    for (file, text) in &expected {
        let path = dir.join(file);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != *text {
            if bless {
                std::fs::create_dir_all(path.parent().context("schema path has no parent")?)?;
                std::fs::write(&path, text)?;
            } else {
                drift.push(file.clone());
            }
        }
    }
    // No file without a type.
    let known: std::collections::HashSet<_> = expected.iter().map(|(f, _)| dir.join(f)).collect();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json")
                && !known.contains(&path)
                && !superseded(&path, &known)
            {
                if bless {
                    std::fs::remove_file(&path)?;
                } else {
                    drift.push(format!("{} (no such contract)", path.display()));
                }
            }
        }
    }
    if !drift.is_empty() {
        bail!(
            "schemas/ differs from the Rust types in: {}\nrun SKEIN_BLESS_SCHEMAS=1 cargo nextest run -p skein-contracts and review the diff",
            drift.join(", ")
        );
    }
    Ok(())
}
