//! The documentation's relative links: every `[text](target)` in README.md,
//! CONTRIBUTING.md, CHANGELOG.md and docs/*.md that is not a web or mail
//! address names a file of the repository, and a `#anchor` names a heading
//! of that file (its GitHub slug). No database, no network.

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// The documents whose links are checked, relative to the repository root.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut docs = vec![
        PathBuf::from("README.md"),
        PathBuf::from("CONTRIBUTING.md"),
        PathBuf::from("CHANGELOG.md"),
    ];
    let mut more: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("the docs/ directory")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| p.strip_prefix(root).expect("under the root").to_path_buf())
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// The lines outside fenced code blocks, with their 1-based numbers, so
/// that code samples are neither links nor headings.
fn outside_fences(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m => fence = None,
            (Some(_), _) => {}
            (None, None) => out.push((i + 1, line)),
        }
    }
    out
}

/// `line` with every inline code span (`` `...` ``) replaced by spaces.
fn blank_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// The targets of the inline links `[text](target)` in `line`.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        // The target ends at the parenthesis that closes the one opened.
        let mut depth = 1;
        let mut end = None;
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        match end {
            Some(end) => {
                // A title (`(target "title")`) is not part of the target.
                let target = after[..end].split_whitespace().next().unwrap_or("");
                targets.push(target.trim_matches(['<', '>']).to_string());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    targets
}

/// GitHub's anchor for a heading's text: lower case, letters, digits, `-`
/// and `_` kept, spaces made `-`, everything else dropped. Link text keeps
/// only its words; code spans keep their content.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[words](target)` counts as `words`.
    while let Some(open) = rest.find('[') {
        match rest[open..].find("](") {
            Some(close) => {
                let close = open + close;
                let after = &rest[close + 2..];
                let Some(end) = after.find(')') else { break };
                text.push_str(&rest[..open]);
                text.push_str(&rest[open + 1..close]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    text.push_str(rest);
    text.trim()
        .chars()
        .filter_map(|c| {
            if c == ' ' {
                Some('-')
            } else if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c)
            } else {
                None
            }
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// The anchors of a Markdown document's headings, with GitHub's `-1`, `-2`
/// suffixes for repeated ones.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for (_, line) in outside_fences(text) {
        // A heading's code span is part of its anchor (`## `check`` is #check).
        let line = line.replace('`', "");
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#').trim());
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// `path` with `.` and `..` resolved lexically; None when it climbs out of
/// the repository.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Every broken relative link of `doc` (relative to `root`), as
/// `doc:line: target: reason`.
fn broken_links(root: &Path, doc: &Path) -> Vec<String> {
    let text = fs::read_to_string(root.join(doc))
        .unwrap_or_else(|e| panic!("reading {}: {e}", doc.display()));
    let dir = doc.parent().unwrap_or(Path::new(""));
    let mut broken = Vec::new();
    for (number, line) in outside_fences(&text) {
        for target in link_targets(&blank_code_spans(line)) {
            let lower = target.to_ascii_lowercase();
            if lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("mailto:")
            {
                continue;
            }
            let at = format!("{}:{number}: {target}", doc.display());
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            if file.is_empty() && anchor.is_none() {
                broken.push(format!("{at}: empty link"));
                continue;
            }
            let linked = if file.is_empty() {
                Some(doc.to_path_buf())
            } else {
                normalize(&dir.join(file))
            };
            let Some(linked) = linked else {
                broken.push(format!("{at}: points outside the repository"));
                continue;
            };
            let full = root.join(&linked);
            if !full.exists() {
                broken.push(format!("{at}: no file {}", linked.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if full.extension().is_none_or(|x| x != "md") {
                broken.push(format!("{at}: an anchor into a file that is not Markdown"));
                continue;
            }
            let headings = anchors(&fs::read_to_string(&full).unwrap_or_default());
            if !headings.contains(anchor) {
                broken.push(format!(
                    "{at}: {} has no heading with the anchor #{anchor}",
                    linked.display()
                ));
            }
        }
    }
    broken
}

#[test]
fn relative_links_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = documents(root);
    assert!(
        docs.len() > 3,
        "expected docs/*.md besides the README, found {docs:?}"
    );
    let broken: Vec<String> = docs.iter().flat_map(|d| broken_links(root, d)).collect();
    assert!(
        broken.is_empty(),
        "broken links in the documentation:\n{}",
        broken.join("\n")
    );
}

#[test]
fn broken_links_are_found() {
    let root = std::env::temp_dir().join(format!("conveyour-cdc-docs-{}", std::process::id()));
    fs::create_dir_all(root.join("docs")).unwrap();
    fs::write(
        root.join("docs/a.md"),
        "# Guide\n\n## Mapping tables (`tables:`)\n\n## 1. Prepare the database\n\n## Guide\n",
    )
    .unwrap();
    fs::write(
        root.join("README.md"),
        "# Intro\n\
         [ok](docs/a.md) [ok](docs/a.md#mapping-tables-tables) [ok](docs/a.md#1-prepare-the-database)\n\
         [ok](docs/a.md#guide-1) [ok](#intro) [web](https://example.com/x#y) [mail](mailto:a@b.c)\n\
         `[code](missing.md)` and\n\
         ```\n[fenced](missing.md)\n```\n\
         [gone](docs/b.md) [no heading](docs/a.md#nope) [here](#nothing) [up](../outside.md)\n",
    )
    .unwrap();
    let broken = broken_links(&root, Path::new("README.md"));
    fs::remove_dir_all(&root).ok();
    let targets: Vec<&str> = broken
        .iter()
        .map(|b| b.split(": ").nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        targets,
        ["docs/b.md", "docs/a.md#nope", "#nothing", "../outside.md"],
        "{broken:#?}"
    );
}
