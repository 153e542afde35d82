//! The daemon's module layers (issue 11 item 10, `layout-v2.md`): a module imports only from
//! layers below its own. Today's exceptions are listed in `KNOWN_DEBT`; the test fails on a new
//! exception (a layer crossed the wrong way) and on a listed one that is gone (remove it), so
//! the list only shrinks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level modules of `src/` by layer, lowest first: values and configuration, reporting
/// sinks, what talks to one cluster, the per-collection pipeline, the supervisor, operators'
/// interfaces, the process.
const LAYERS: &[&[&str]] = &[
    &["config"],
    &["exit"],
    &["error"],
    &["model"],
    // Destination writes with a deadline (data, checkpoints, metadata).
    &["fence"],
    &["bounded_write"],
    &["metrics"],
    &["status"],
    &[
        "source",
        "apply",
        "checkpoint",
        "metadata",
        "guard",
        "identity",
        "ha",
    ],
    &["validate"],
    &["worker"],
    &["supervisor"],
    &["ops"],
    // The command line's options, the daemon and its commands.
    &["cli"],
    &["app"],
];

/// Modules of the binary, not of the library: the bootstrap and the demo (which runs the daemon
/// between two simulators and imports it as `mongo_syncd::`).
const BINARY_MODULES: &[&str] = &["main", "demo"];

/// Imports that cross the layers the wrong way today (importer → imported).
const KNOWN_DEBT: &[(&str, &str)] = &[
    ("model", "metrics"),
    ("source", "checkpoint"),
    ("source", "metadata"),
    ("apply", "metadata"),
    ("apply", "source"),
    ("guard", "source"),
    ("identity", "checkpoint"),
    ("identity", "metadata"),
    ("identity", "source"),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file under `src/` belongs to (`src/apply/conflict.rs` → `apply`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn identifier_at(text: &str, at: usize) -> String {
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Top-level modules named by `crate::x` paths and by the items of `use crate::{x, y::z}`.
fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let name = identifier_at(&code, at + "crate::".len());
        if !name.is_empty() {
            found.insert(name);
        }
    }
    for (at, _) in code.match_indices("use crate::{") {
        let bytes = code.as_bytes();
        let (mut i, mut depth, mut item_start) = (at + "use crate::{".len(), 1, true);
        while depth > 0 && i < bytes.len() {
            match bytes[i] {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                b',' if depth == 1 => item_start = true,
                c if depth == 1 && item_start && (c.is_ascii_alphabetic() || c == b'_') => {
                    let name = identifier_at(&code, i);
                    i += name.len();
                    found.insert(name);
                    item_start = false;
                    continue;
                }
                c if !c.is_ascii_whitespace() => item_start = false,
                _ => {}
            }
            i += 1;
        }
    }
    found.remove("self");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The library's files under `src/` with their top-level module (the crate root `lib.rs` and
/// the binary's modules left out), and the text of each.
fn library_files() -> Vec<(String, std::path::PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|file| (module_of(&src, &file), file))
        .filter(|(module, _)| module != "lib" && !BINARY_MODULES.contains(&module.as_str()))
        .map(|(module, file)| {
            let text = std::fs::read_to_string(&file).unwrap();
            (module, file, text)
        })
        .collect()
}

#[test]
fn modules_import_only_from_lower_layers_apart_from_the_listed_debt() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, _, text) in library_files() {
        let imported = imports(&text);
        edges
            .entry(module.clone())
            .or_default()
            .extend(imported.into_iter().filter(|m| *m != module));
    }
    let mut unplaced = Vec::new();
    let mut crossing = BTreeSet::new();
    for (from, targets) in &edges {
        let Some(from_layer) = layer_of(from) else {
            unplaced.push(from.clone());
            continue;
        };
        for to in targets {
            match layer_of(to) {
                None => unplaced.push(to.clone()),
                Some(to_layer) if to_layer >= from_layer => {
                    crossing.insert((from.clone(), to.clone()));
                }
                Some(_) => {}
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS: {unplaced:?}"
    );
    let debt: BTreeSet<(String, String)> = KNOWN_DEBT
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = crossing.difference(&debt).collect();
    assert!(
        new.is_empty(),
        "imports that cross the layers the wrong way (import from a lower layer, or move the code): {new:?}"
    );
    let paid: Vec<_> = debt.difference(&crossing).collect();
    assert!(
        paid.is_empty(),
        "debt paid off: remove these from KNOWN_DEBT: {paid:?}"
    );
}

#[test]
fn imports_are_read_from_paths_and_grouped_uses() {
    let text = "use crate::{\n    apply::conflict::X,\n    model::{event, id_key},\n    self,\n};\n// crate::ops in a comment\nfn f() { crate::source::feed::g(); }\n";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["apply", "model", "source"]);
}

/// The demo is the binary's (issue 11 item 10): the library declares no `demo` module and no
/// library module names it, so the daemon links the simulator only for the demo and the tests.
#[test]
fn the_demo_belongs_to_the_binary_not_the_library() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    assert!(!lib.contains("mod demo"), "src/lib.rs declares the demo");
    let main = std::fs::read_to_string(src.join("main.rs")).unwrap();
    assert!(
        main.contains("mod demo;"),
        "src/main.rs does not declare the demo"
    );
    for (_, file, text) in library_files() {
        assert!(
            !imports(&text).contains("demo"),
            "{} imports the demo",
            file.display()
        );
    }
}
