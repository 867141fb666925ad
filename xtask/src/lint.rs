//! `cargo xtask lint`: formatting, clippy (host crates, and the BPF crate the
//! way it compiles: nightly, `bpfel-unknown-none`, `core` from source), and the
//! daemon's module graph, which must have no cycle.
//!
//! The module check reads the daemon's sources as text, not through the
//! compiler: a module `a` depends on `b` when its code names `crate::b...`,
//! `super::...` or a child module's path (`b::x` after `mod b;`), in a `use`
//! or inline. A module's own `mod` declarations, and `pub use` of its children
//! (the parent exporting what lives below it), are not dependencies. Inline
//! `#[cfg(test)]` test modules are left out: a test may look anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Runs every lint step; fails on the first one that finds something.
pub fn run(root: &Path, bpf_clippy: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("lint: rustfmt");
    let fuzz_targets: Vec<PathBuf> = std::fs::read_dir(root.join("fuzz/fuzz_targets"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "rs")).collect()
        })
        .unwrap_or_default();
    super::exec(super::cargo().args(["fmt", "--all", "--check"]))?;
    if !fuzz_targets.is_empty() {
        let mut cmd = std::process::Command::new("rustfmt");
        cmd.args(["--check", "--edition", "2021", "--config-path"]).arg(root.join("rustfmt.toml")).args(&fuzz_targets);
        super::exec(&mut cmd)?;
    }
    eprintln!("lint: clippy (host crates)");
    super::exec(super::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    eprintln!("lint: clippy (the BPF crate, for bpfel-unknown-none)");
    bpf_clippy()?;
    eprintln!("lint: module graph");
    let graph = ModuleGraph::read(&root.join("proxy-daemon/src"))?;
    let mut cycles = graph.cycles();
    let tops = graph.top_level();
    cycles.extend(tops.cycles().into_iter().map(|c| c.into_iter().map(|m| format!("{m} (folder)")).collect()));
    if !cycles.is_empty() {
        let mut msg = String::from("import cycles among the daemon's modules:\n");
        for cycle in &cycles {
            msg += &format!("  {}\n", cycle.join(" <-> "));
            let (g, cycle) = match cycle[0].strip_suffix(" (folder)") {
                Some(_) => (&tops, cycle.iter().map(|m| m.trim_end_matches(" (folder)").to_string()).collect()),
                None => (&graph, cycle.clone()),
            };
            for (from, to) in g.edges_within(&cycle) {
                msg += &format!("    {from} -> {to}: {}\n", g.evidence[&(from.clone(), to.clone())]);
            }
        }
        bail!(msg);
    }
    eprintln!(
        "lint: {} modules, {} dependencies, no cycle (nor between top-level modules)",
        graph.modules.len(),
        graph.evidence.len()
    );
    Ok(())
}

/// The daemon's modules (`crate::a::b` as `a::b`, the crate root as `crate`)
/// and who names whom.
pub struct ModuleGraph {
    modules: BTreeSet<String>,
    /// (from, to) -> where (file:line), the first occurrence.
    evidence: BTreeMap<(String, String), String>,
}

impl ModuleGraph {
    /// Reads every `.rs` file under `src` (the library's modules; `main.rs`
    /// is the binary, which only uses the library).
    pub fn read(src: &Path) -> Result<Self> {
        let mut files = Vec::new();
        collect(src, &mut files)?;
        let mut modules = BTreeMap::new();
        for file in files {
            let rel = file.strip_prefix(src).unwrap().with_extension("");
            let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            let path = match parts.as_slice() {
                [only] if only == "lib" => "crate".to_string(),
                [only] if only == "main" => continue,
                [init @ .., last] if last == "mod" => init.join("::"),
                all => all.join("::"),
            };
            modules.insert(path, file);
        }
        let names: BTreeSet<String> = modules.keys().cloned().collect();
        let mut evidence = BTreeMap::new();
        for (module, file) in &modules {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let children: Vec<&str> = names.iter().filter_map(|n| child_name(module, n)).collect();
            for (line_no, line) in &code_lines(&text) {
                if is_module_decl(line) || reexports_child(line, &children) {
                    continue;
                }
                for target in references(module, line, &children) {
                    let Some(to) = resolve(&names, &target) else { continue };
                    if to != *module {
                        let at = format!("{}:{}", file.display(), line_no);
                        evidence.entry((module.clone(), to)).or_insert(at);
                    }
                }
            }
        }
        Ok(ModuleGraph { modules: names, evidence })
    }

    /// Strongly connected components with more than one module (Tarjan).
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let nodes: Vec<&String> = self.modules.iter().collect();
        let index_of: BTreeMap<&String, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut adj = vec![Vec::new(); nodes.len()];
        for (from, to) in self.evidence.keys() {
            adj[index_of[from]].push(index_of[to]);
        }
        let mut t = Tarjan { adj, index: vec![None; nodes.len()], low: vec![0; nodes.len()], ..Default::default() };
        for v in 0..nodes.len() {
            if t.index[v].is_none() {
                t.visit(v);
            }
        }
        t.components
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|c| {
                let mut names: Vec<String> = c.into_iter().map(|i| nodes[i].clone()).collect();
                names.sort();
                names
            })
            .collect()
    }

    /// The same graph with every module folded into its top-level module
    /// (`config::render` into `config`): a folder's modules may depend on each
    /// other, but two folders must not depend on each other.
    pub fn top_level(&self) -> ModuleGraph {
        let top = |m: &String| m.split("::").next().unwrap_or(m).to_string();
        let modules = self.modules.iter().map(top).collect();
        let mut evidence = BTreeMap::new();
        for ((from, to), at) in &self.evidence {
            let (from, to) = (top(from), top(to));
            if from != to && from != "crate" {
                evidence.entry((from, to)).or_insert_with(|| at.clone());
            }
        }
        ModuleGraph { modules, evidence }
    }

    fn edges_within(&self, cycle: &[String]) -> Vec<(String, String)> {
        self.evidence.keys().filter(|(a, b)| cycle.contains(a) && cycle.contains(b)).cloned().collect()
    }
}

#[derive(Default)]
struct Tarjan {
    adj: Vec<Vec<usize>>,
    index: Vec<Option<usize>>,
    low: Vec<usize>,
    next: usize,
    stack: Vec<usize>,
    on_stack: BTreeSet<usize>,
    components: Vec<Vec<usize>>,
}

impl Tarjan {
    fn visit(&mut self, v: usize) {
        self.index[v] = Some(self.next);
        self.low[v] = self.next;
        self.next += 1;
        self.stack.push(v);
        self.on_stack.insert(v);
        for w in self.adj[v].clone() {
            match self.index[w] {
                None => {
                    self.visit(w);
                    self.low[v] = self.low[v].min(self.low[w]);
                }
                Some(iw) if self.on_stack.contains(&w) => self.low[v] = self.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(self.low[v]) == self.index[v] {
            let mut component = Vec::new();
            while let Some(w) = self.stack.pop() {
                self.on_stack.remove(&w);
                component.push(w);
                if w == v {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `name` if `module` is `parent`'s direct child.
fn child_name<'a>(parent: &str, module: &'a str) -> Option<&'a str> {
    let rest = if parent == "crate" { Some(module) } else { module.strip_prefix(parent)?.strip_prefix("::") };
    rest.filter(|r| *r != "crate" && !r.contains("::"))
}

/// The code lines of a file with their numbers: comments and string
/// literals blanked, inline `#[cfg(test)] mod ... { }` blocks left out.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_test = false;
    let mut depth = 0i32;
    let mut pending_test = false;
    for (i, raw) in text.lines().enumerate() {
        let line = strip(raw);
        let trimmed = line.trim();
        if !in_test && trimmed.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        if pending_test && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            in_test = true;
            depth = 0;
        }
        pending_test = pending_test && trimmed.starts_with("#[");
        if in_test {
            depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if depth <= 0 {
                in_test = false;
            }
            continue;
        }
        out.push((i + 1, line));
    }
    out
}

/// One line without its `//` comment and with string contents blanked.
fn strip(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_str => {
                chars.next();
            }
            '"' => {
                in_str = !in_str;
                out.push('"');
            }
            '/' if !in_str && chars.peek() == Some(&'/') => break,
            _ if in_str => {}
            _ => out.push(c),
        }
    }
    out
}

fn is_module_decl(line: &str) -> bool {
    let t = line.trim_start();
    let t = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub ")).unwrap_or(t);
    t.starts_with("mod ") && t.trim_end().ends_with(';')
}

/// `pub use child::...` (also `pub use self::child::...`): the parent exports
/// what lives below it.
fn reexports_child(line: &str, children: &[&str]) -> bool {
    let t = line.trim_start();
    let Some(rest) = t.strip_prefix("pub use ").or_else(|| t.strip_prefix("pub(crate) use ")) else { return false };
    let rest = rest.strip_prefix("self::").unwrap_or(rest);
    children.iter().any(|c| rest.starts_with(&format!("{c}::")))
}

/// Absolute module paths (`a::b::item...`, or `crate`) that `line` names.
fn references(module: &str, line: &str, children: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for path in paths(line) {
        let mut segs: Vec<&str> = path.split("::").map(str::trim).filter(|s| !s.is_empty()).collect();
        let mut base: Vec<String> =
            if module == "crate" { Vec::new() } else { module.split("::").map(String::from).collect() };
        match segs.first().copied() {
            Some("crate") => {
                base.clear();
                segs.remove(0);
            }
            Some("super") => {
                while segs.first() == Some(&"super") {
                    segs.remove(0);
                    base.pop();
                }
            }
            Some("self") => {
                segs.remove(0);
            }
            Some(first) if children.contains(&first) => {}
            _ => continue,
        }
        let mut full = base;
        full.extend(segs.iter().map(|s| s.to_string()));
        out.push(if full.is_empty() { "crate".to_string() } else { full.join("::") });
    }
    out
}

/// Paths in a line, with `use` groups expanded one level
/// (`use super::{a, b::c}` gives `super::a` and `super::b::c`).
fn paths(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_' || bytes[i - 1] == ':');
        if starts && (bytes[i].is_alphabetic() || bytes[i] == '_') {
            let mut j = i;
            while j < bytes.len() && (bytes[j].is_alphanumeric() || bytes[j] == '_' || bytes[j] == ':') {
                j += 1;
            }
            let path: String = bytes[i..j].iter().collect();
            if path.contains("::") {
                if path.ends_with("::") && j < bytes.len() && bytes[j] == '{' {
                    let close = bytes[j..].iter().position(|&c| c == '}').map_or(bytes.len(), |p| j + p);
                    let group: String = bytes[j + 1..close].iter().collect();
                    for item in group.split(',') {
                        let item = item.trim().split(" as ").next().unwrap_or("").trim();
                        if !item.is_empty() && item != "self" {
                            out.push(format!("{path}{item}"));
                        } else if item == "self" {
                            out.push(path.trim_end_matches("::").to_string());
                        }
                    }
                    i = close;
                    continue;
                }
                out.push(path);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The module a path lands in: its longest prefix that is a module.
fn resolve(names: &BTreeSet<String>, path: &str) -> Option<String> {
    if path == "crate" {
        return Some(path.to_string());
    }
    let segs: Vec<&str> = path.split("::").collect();
    (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|p| names.contains(p)).or_else(|| Some("crate".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> ModuleGraph {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xtask-lint-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let g = ModuleGraph::read(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        g
    }

    #[test]
    fn finds_a_cycle_between_siblings_and_its_lines() {
        let g = graph(&[
            ("lib.rs", "pub mod a;\npub mod b;\n"),
            ("a.rs", "use crate::b::Thing;\n"),
            ("b/mod.rs", "pub fn f() { crate::a::g(); }\n"),
        ]);
        assert_eq!(g.cycles(), vec![vec!["a".to_string(), "b".to_string()]]);
        assert!(g.evidence[&("b".into(), "a".into())].ends_with("b/mod.rs:1"));
    }

    #[test]
    fn parent_child_use_groups_tests_and_comments() {
        // The child uses its parent, the parent only declares and re-exports
        // it: no cycle. A comment or string naming a path, and a test module,
        // do not count.
        let g = graph(&[
            ("lib.rs", "pub mod p;\n"),
            ("p/mod.rs", "mod c;\npub use c::Item;\n// see crate::p::c::x\nconst S: &str = \"c::y\";\n#[cfg(test)]\nmod tests {\n    use super::c::Z;\n}\n"),
            ("p/c.rs", "use super::{Shared, other::Thing as T};\n"),
        ]);
        assert!(g.cycles().is_empty(), "{:?}", g.evidence);
        assert!(g.evidence.contains_key(&("p::c".into(), "p".into())));
        // The parent calling into its child closes the cycle.
        let g = graph(&[
            ("lib.rs", "pub mod p;\n"),
            ("p/mod.rs", "mod c;\nfn f() { c::run(); }\n"),
            ("p/c.rs", "use super::X;\n"),
        ]);
        assert_eq!(g.cycles(), vec![vec!["p".to_string(), "p::c".to_string()]]);
    }
}
