//! The source tree's shape, read from `src/` (no database): no import cycle
//! between the crate's top-level modules, nor between the files of one
//! module (its `mod.rs` counted as one of them); the stages' bans
//! (`decode` knows nothing of `config`, `snapshot` and `sink` nothing of
//! `pipeline`, `source` nothing of `mapping`, `telemetry` nothing of
//! `source`); and no file over 800 lines outside its tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Longest a file may be, its `#[cfg(test)] mod tests` aside.
const MAX_LINES: usize = 800;

/// `(importer, imported)` top-level modules that must not meet.
const BANNED: &[(&str, &str)] = &[
    ("decode", "config"),
    ("snapshot", "pipeline"),
    ("sink", "pipeline"),
    ("source", "mapping"),
    ("telemetry", "source"),
];

struct File {
    path: PathBuf,
    /// Its module path: `src/source/slot.rs` is `[source, slot]`, a
    /// `mod.rs` is its directory's module.
    module: Vec<String>,
    /// The code, tests and comments left out.
    code: String,
    /// Lines before its test module.
    lines: usize,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("a readable src/ directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

fn module_of(src: &Path, path: &Path) -> Vec<String> {
    let rel = path
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The code before the test module, without comments and without the one
/// item after any other `#[cfg(test)]`; and how many lines that is.
fn code_of(text: &str) -> (String, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let mut code = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line == "#[cfg(test)]" {
            if lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with("mod "))
            {
                break;
            }
            i += 2;
            continue;
        }
        if !line.starts_with("//") {
            code.push(lines[i]);
        }
        i += 1;
    }
    (code.join("\n"), i)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first segment of each path that follows `prefix` in `code`, where
/// `prefix` starts a path (not preceded by `::` or an identifier): `a` of
/// `prefix::a::b`, `a` and `b` of `prefix::{a::x, b}`.
fn segments_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(prefix) {
        let start = from + at;
        from = start + prefix.len();
        let before = &code[..start];
        if before.ends_with("::") || before.chars().last().is_some_and(is_ident) {
            continue;
        }
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut piece_start = 0;
            let mut pieces = Vec::new();
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        pieces.push(&group[piece_start..i]);
                        piece_start = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            for piece in pieces {
                let piece = piece.trim();
                let end = piece.find(|c: char| !is_ident(c)).unwrap_or(piece.len());
                if end > 0 {
                    out.push(&piece[..end]);
                }
            }
        } else {
            let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
            if end > 0 {
                out.push(&rest[..end]);
            }
        }
    }
    out
}

/// The module paths (as far as they name modules or items) a file refers
/// to: `crate::x…`, `super::…::x…`, and, outside re-exports, its own
/// children `child::…`.
fn references(file: &File, modules: &BTreeSet<Vec<String>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let path_word = |s: &&str| !matches!(*s, "super" | "self" | "crate");
    for first in segments_after(&file.code, "crate::")
        .into_iter()
        .filter(path_word)
    {
        out.push(vec![first.to_owned()]);
    }
    for depth in (1..=3).rev() {
        let prefix = "super::".repeat(depth);
        for first in segments_after(&file.code, &prefix)
            .into_iter()
            .filter(path_word)
        {
            if file.module.len() >= depth {
                let mut path = file.module[..file.module.len() - depth].to_vec();
                path.push(first.to_owned());
                out.push(path);
            }
        }
    }
    // A module's own children, by relative path, in code other than its
    // re-exports (`pub use child::…` is the module's surface, not a use).
    let own: String = file
        .code
        .lines()
        .filter(|l| !l.trim_start().starts_with("pub"))
        .collect::<Vec<_>>()
        .join("\n");
    for child in modules
        .iter()
        .filter(|m| m.len() == file.module.len() + 1 && m.starts_with(&file.module))
    {
        let name = child.last().expect("a child has a name");
        if !segments_after(&own, &format!("{name}::")).is_empty()
            || own.contains(&format!("use {name}::"))
        {
            out.push(child.clone());
        }
    }
    out
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|n| n == next).expect("on the stack");
                    let mut found = stack[at..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                Some(_) => {}
                None => {
                    if let Some(found) = visit(next, graph, state, stack) {
                        return Some(found);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(found) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(found);
            }
        }
    }
    None
}

fn read_src() -> Vec<File> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        // The binary sits on top and imports the library by name.
        .filter(|p| !p.ends_with("main.rs"))
        .map(|path| {
            let text = fs::read_to_string(&path).expect("a readable source file");
            let (code, lines) = code_of(&text);
            File {
                module: module_of(&src, &path),
                path,
                code,
                lines,
            }
        })
        .collect()
}

#[test]
fn no_import_cycles_and_no_banned_imports() {
    let files = read_src();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let top: BTreeSet<&str> = modules
        .iter()
        .filter_map(|m| m.first().map(String::as_str))
        .collect();

    // Between the top-level modules.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut banned = Vec::new();
    for file in files.iter().filter(|f| !f.module.is_empty()) {
        let from = &file.module[0];
        for to in references(file, &modules) {
            let to = &to[0];
            if to != from && top.contains(to.as_str()) {
                graph.entry(from.clone()).or_default().insert(to.clone());
                if BANNED.contains(&(from.as_str(), to.as_str())) {
                    banned.push(format!("{} imports {to}", file.path.display()));
                }
            }
        }
    }
    assert!(banned.is_empty(), "banned imports: {banned:#?}");
    assert_eq!(cycle(&graph), None, "a cycle between top-level modules");

    // Between the files of each module that has files of its own.
    let parents: BTreeSet<&Vec<String>> = modules
        .iter()
        .filter(|m| {
            modules
                .iter()
                .any(|c| c.len() == m.len() + 1 && c.starts_with(m))
        })
        .collect();
    for parent in parents {
        let node = |path: &[String]| -> Option<String> {
            if !path.starts_with(parent) || path.len() <= parent.len() {
                return None;
            }
            let child = &path[..=parent.len()];
            Some(if modules.contains(child) {
                child.join("/")
            } else {
                // An item of the parent module's own file.
                format!("{}/mod", parent.join("/"))
            })
        };
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let from = if &file.module == parent {
                format!("{}/mod", parent.join("/"))
            } else {
                match node(&file.module) {
                    Some(n) => n,
                    None => continue,
                }
            };
            for to in references(file, &modules) {
                if let Some(to) = node(&to) {
                    if to != from {
                        graph.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
        assert_eq!(
            cycle(&graph),
            None,
            "a cycle between the files of module {}",
            parent.join("::")
        );
    }
}

#[test]
fn no_source_file_is_over_800_lines_outside_its_tests() {
    let long: Vec<String> = read_src()
        .iter()
        .filter(|f| f.lines > MAX_LINES)
        .map(|f| format!("{}: {} lines", f.path.display(), f.lines))
        .collect();
    assert!(long.is_empty(), "split these along their seams: {long:#?}");
}

#[test]
fn the_reader_finds_imports_in_each_form() {
    let code = "use crate::{config::X, source};\nuse super::super::wire::{a, b};\nlet x = crate::sql::quote(1);\nstd::time::Duration";
    assert_eq!(segments_after(code, "crate::"), ["config", "source", "sql"]);
    assert_eq!(segments_after(code, "super::super::"), ["wire"]);
    // `time::` inside `std::time::` is not a path of its own.
    assert!(segments_after(code, "time::").is_empty());
    let (kept, lines) = code_of("use a;\n// use crate::b;\n#[cfg(test)]\nuse crate::c;\nfn f() {}\n#[cfg(test)]\nmod tests {\n}\n");
    assert_eq!(kept, "use a;\nfn f() {}");
    assert_eq!(lines, 5);
}
