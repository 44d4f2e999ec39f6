//! The source tree's shape, read from `src/` (no database): no import cycle
//! between the crate's top-level modules, nor between the files of one
//! module (its own file counted as one of them); the stages' bans
//! (`decode` knows nothing of `config`, `snapshot` and `sink` nothing of
//! `pipeline`, `source` nothing of `mapping`, `telemetry` nothing of
//! `source`); and no file over 800 lines outside its tests.
//!
//! Paths are followed through re-exports to the module that defines the
//! item: `crate::Error` is `error`'s, `super::Foo` is the sibling file's
//! that `mod.rs` re-exports it from.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Longest a file may be, its `#[cfg(test)] mod tests { … }` aside.
const MAX_LINES: usize = 800;

/// `(importer, imported)` top-level modules that must not meet.
const BANNED: &[(&str, &str)] = &[
    ("decode", "config"),
    ("snapshot", "pipeline"),
    ("sink", "pipeline"),
    ("source", "mapping"),
    ("telemetry", "source"),
];

type ModPath = Vec<String>;

struct File {
    path: PathBuf,
    /// Its module path: `src/source/slot.rs` is `[source, slot]`, a
    /// `mod.rs` is its directory's module, `lib.rs` is `[]`.
    module: ModPath,
    /// Its `use` statements: whether `pub`, and the use tree.
    uses: Vec<(bool, String)>,
    /// The rest of the code, tests and comments left out.
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

fn module_of(src: &Path, path: &Path) -> ModPath {
    let rel = path
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let mut parts: ModPath = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let root = parts.len() == 1 && parts[0] == "lib";
    if root || parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code before the inline test module, without comments and without
/// the one item after any other `#[cfg(test)]`; and how many lines that
/// is.
fn code_of(text: &str) -> (String, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let mut code = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line == "#[cfg(test)]" {
            let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
            if next.starts_with("mod ") && next.ends_with('{') {
                break;
            }
            i += 2;
            continue;
        }
        let line = match lines[i].find("//") {
            // A comment, unless the `//` is inside a string ("https://").
            Some(at) if !lines[i][..at].contains('"') => &lines[i][..at],
            _ => lines[i],
        };
        if !line.trim().is_empty() {
            code.push(line);
        }
        i += 1;
    }
    (code.join("\n"), i)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Splits the code into its `use` statements (whether `pub`, the tree)
/// and the rest. A statement starts a line (`use …`, `pub use …`,
/// `pub(crate) use …`) and ends at its `;`.
fn split_uses(code: &str) -> (Vec<(bool, String)>, String) {
    let mut uses = Vec::new();
    let mut rest = Vec::new();
    let mut open: Option<(bool, String)> = None;
    for line in code.lines() {
        if let Some((public, mut tree)) = open.take() {
            tree.push(' ');
            tree.push_str(line.trim());
            match tree.strip_suffix(';') {
                Some(done) => uses.push((public, done.trim().to_owned())),
                None => open = Some((public, tree)),
            }
            continue;
        }
        let trimmed = line.trim_start();
        let public = trimmed.starts_with("pub");
        let after_pub = if public {
            let after = trimmed["pub".len()..].trim_start();
            match after.strip_prefix('(') {
                Some(inner) => inner.split_once(')').map_or("", |(_, r)| r).trim_start(),
                None => after,
            }
        } else {
            trimmed
        };
        match after_pub.strip_prefix("use ") {
            Some(tree) => match tree.trim_end().strip_suffix(';') {
                Some(done) => uses.push((public, done.trim().to_owned())),
                None => open = Some((public, tree.trim().to_owned())),
            },
            None => rest.push(line),
        }
    }
    (uses, rest.join("\n"))
}

/// Each leaf of a use tree: its path and the name it is known by here.
/// `a::{b, c::d as e, self}` is `[a, b]` as `b`, `[a, c, d]` as `e`,
/// `[a]` as `a`.
fn expand(tree: &str) -> Vec<(Vec<String>, String)> {
    let tree: String = tree
        .chars()
        .filter(|c| !c.is_whitespace() || *c == ' ')
        .collect();
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix: Vec<String> = tree[..open]
            .split("::")
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().to_owned())
            .collect();
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut pieces = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    pieces.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        pieces.push(&inner[start..]);
        let mut out = Vec::new();
        for piece in pieces.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            for (path, name) in expand(piece) {
                let mut full = prefix.clone();
                if path != ["self"] {
                    full.extend(path);
                }
                let name = if name == "self" {
                    full.last().cloned().unwrap_or_default()
                } else {
                    name
                };
                out.push((full, name));
            }
        }
        return out;
    }
    let (path, alias) = match tree.split_once(" as ") {
        Some((path, alias)) => (path.trim(), Some(alias.trim().to_owned())),
        None => (tree, None),
    };
    let path: Vec<String> = path.split("::").map(|s| s.trim().to_owned()).collect();
    let name = alias.unwrap_or_else(|| path.last().cloned().unwrap_or_default());
    vec![(path, name)]
}

/// Paths written inline in `code` that start with `crate::`, `super::`,
/// `self::` or one of `children::`, as far as they go.
fn inline_paths(code: &str, children: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = code.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        let before = code[..at].chars().last();
        let starts_path = is_ident(c)
            && !before.is_some_and(|b| is_ident(b) || b == ':' || b == '.' || b == '\'');
        if !starts_path {
            i += 1;
            continue;
        }
        let mut segments = Vec::new();
        let mut pos = at;
        loop {
            let len = code[pos..]
                .find(|c: char| !is_ident(c))
                .unwrap_or(code.len() - pos);
            segments.push(code[pos..pos + len].to_owned());
            pos += len;
            if code[pos..].starts_with("::") && code[pos + 2..].starts_with(is_ident) {
                pos += 2;
            } else {
                break;
            }
        }
        let first = segments[0].as_str();
        // `pub(in crate::x)` names a visibility, not an import.
        let visibility = code[..at].ends_with("(in ");
        if segments.len() > 1
            && !visibility
            && (matches!(first, "crate" | "super" | "self") || children.iter().any(|c| c == first))
        {
            out.push(segments);
        }
        while i < chars.len() && chars[i].0 < pos {
            i += 1;
        }
    }
    out
}

/// `path` as written in `module`, made absolute; None for another crate's.
fn absolute(module: &[String], path: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let mut base: ModPath;
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            base = Vec::new();
            rest = &path[1..];
        }
        Some("self") => {
            base = module.to_vec();
            rest = &path[1..];
        }
        Some("super") => {
            base = module.to_vec();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        Some(first) => {
            let mut child = module.to_vec();
            child.push(first.to_owned());
            if !modules.contains(&child) {
                return None;
            }
            base = module.to_vec();
        }
        None => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// What each module re-exports: `(module, name)` to the absolute path.
fn reexports(files: &[File], modules: &BTreeSet<ModPath>) -> BTreeMap<(ModPath, String), ModPath> {
    let mut map = BTreeMap::new();
    for file in files {
        for (public, tree) in &file.uses {
            if !public {
                continue;
            }
            for (path, name) in expand(tree) {
                if let Some(target) = absolute(&file.module, &path, modules) {
                    map.insert((file.module.clone(), name), target);
                }
            }
        }
    }
    map
}

/// The module an absolute path leads to, through re-exports.
fn resolve(
    mut path: ModPath,
    modules: &BTreeSet<ModPath>,
    reexported: &BTreeMap<(ModPath, String), ModPath>,
) -> ModPath {
    for _ in 0..8 {
        let known = (0..=path.len())
            .rev()
            .find(|&k| modules.contains(&path[..k].to_vec()))
            .unwrap_or(0);
        let Some(item) = path.get(known) else {
            return path;
        };
        match reexported.get(&(path[..known].to_vec(), item.clone())) {
            Some(target) if target != &path[..=known] => {
                let mut next = target.clone();
                next.extend(path[known + 1..].iter().cloned());
                path = next;
            }
            _ => return path[..known].to_vec(),
        }
    }
    path
}

/// The modules `file` imports, resolved; a module's re-export of its own
/// child is its surface, not an import.
fn imports(
    file: &File,
    modules: &BTreeSet<ModPath>,
    reexported: &BTreeMap<(ModPath, String), ModPath>,
) -> Vec<ModPath> {
    let children: Vec<String> = modules
        .iter()
        .filter(|m| m.len() == file.module.len() + 1 && m.starts_with(&file.module))
        .map(|m| m[file.module.len()].clone())
        .collect();
    let mut written = Vec::new();
    for (public, tree) in &file.uses {
        for (path, _) in expand(tree) {
            let Some(abs) = absolute(&file.module, &path, modules) else {
                continue;
            };
            let own_child = abs.len() > file.module.len() && abs.starts_with(&file.module);
            if !(*public && own_child) {
                written.push(abs);
            }
        }
    }
    for path in inline_paths(&file.code, &children) {
        written.extend(absolute(&file.module, &path, modules));
    }
    written
        .into_iter()
        .map(|p| resolve(p, modules, reexported))
        .collect()
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
            let (uses, code) = split_uses(&code);
            File {
                module: module_of(&src, &path),
                path,
                uses,
                code,
                lines,
            }
        })
        .collect()
}

#[test]
fn no_import_cycles_and_no_banned_imports() {
    let files = read_src();
    let modules: BTreeSet<ModPath> = files.iter().map(|f| f.module.clone()).collect();
    let reexported = reexports(&files, &modules);
    let imported: Vec<(&File, Vec<ModPath>)> = files
        .iter()
        .map(|f| (f, imports(f, &modules, &reexported)))
        .collect();

    // Between the top-level modules.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut banned = Vec::new();
    for (file, targets) in &imported {
        let Some(from) = file.module.first() else {
            continue;
        };
        for to in targets.iter().filter_map(|t| t.first()) {
            if to != from {
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
    let parents: BTreeSet<&ModPath> = modules
        .iter()
        .filter(|m| !m.is_empty())
        .filter(|m| {
            modules
                .iter()
                .any(|c| c.len() == m.len() + 1 && c.starts_with(m))
        })
        .collect();
    for parent in parents {
        let own = format!("{}/mod", parent.join("/"));
        let node = |path: &ModPath| -> Option<String> {
            if !path.starts_with(parent) {
                return None;
            }
            Some(match path.get(parent.len()) {
                Some(_) => path[..=parent.len()].join("/"),
                None => own.clone(),
            })
        };
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (file, targets) in &imported {
            let Some(from) = node(&file.module) else {
                continue;
            };
            for to in targets.iter().filter_map(node) {
                if to != from {
                    graph.entry(from.clone()).or_default().insert(to);
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
fn the_reader_follows_each_form_of_path() {
    let (code, lines) = code_of(
        "use a;\n// use crate::b;\n#[cfg(test)]\nuse crate::c;\nfn f() {} // crate::d\n#[cfg(test)]\nmod helpers;\n#[cfg(test)]\nmod tests {\n}\n",
    );
    assert_eq!(code, "use a;\nfn f() {} ");
    assert_eq!(lines, 7);

    let (uses, rest) = split_uses(
        "use crate::{config::X, source};\npub(crate) use self::wire::{a, b as c};\nfn f() { crate::sql::q(); let t = std::time::Duration::ZERO; }",
    );
    assert_eq!(
        uses,
        [
            (false, "crate::{config::X, source}".to_owned()),
            (true, "self::wire::{a, b as c}".to_owned())
        ]
    );
    assert_eq!(
        expand(&uses[1].1),
        [
            (
                vec!["self".into(), "wire".into(), "a".into()],
                "a".to_owned()
            ),
            (
                vec!["self".into(), "wire".into(), "b".into()],
                "c".to_owned()
            ),
        ]
    );
    // `time::` inside `std::time::` is not a path of a child `time`.
    assert_eq!(
        inline_paths(&rest, &["time".to_owned()]),
        [vec!["crate".to_owned(), "sql".into(), "q".into()]]
    );

    let m = |p: &str| -> ModPath {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let modules: BTreeSet<ModPath> = ["", "error", "source", "source/slot"].map(m).into();
    let mut reexported = BTreeMap::new();
    reexported.insert((m(""), "Error".to_owned()), m("error/Error"));
    reexported.insert((m("source"), "Info".to_owned()), m("source/slot/Info"));
    assert_eq!(resolve(m("Error"), &modules, &reexported), m("error"));
    assert_eq!(
        resolve(m("source/Info"), &modules, &reexported),
        m("source/slot")
    );
    assert_eq!(
        resolve(m("source/slot/f"), &modules, &reexported),
        m("source/slot")
    );
    assert_eq!(
        absolute(&m("source/slot"), &m("super/super/error/Error"), &modules),
        Some(m("error/Error"))
    );
    assert_eq!(absolute(&m("source"), &m("tokio/spawn"), &modules), None);
}
