//! Scans of the sources. Every query binds the tenant: a scan of the suite's SQL. The tables that carry a
//! `tenant_id` column are read from the migrations; every SQL string literal in the
//! services and the store that reads or writes one of them must name `tenant_id`. The few
//! statements that work across tenants on purpose are listed below with their reason; a new
//! one fails this test until it binds the tenant or is listed.
//!
//! A heuristic, not a proof: it sees string literals (a statement assembled from several
//! pieces is checked piece by piece), and it ignores test modules.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// `(file, table, start of the statement)`: statements that span tenants on purpose.
const ACROSS_TENANTS: &[(&str, &str, &str, &str)] = &[
    (
        "libs/store/src/queue.rs",
        "work_queue",
        "",
        "a queue's workers claim due items of every tenant; a claimed item is then addressed by its id and the claim's token",
    ),
    (
        "libs/store/src/outbox.rs",
        "outbox",
        "",
        "the event relay claims undelivered events of every tenant and settles them by id and lease",
    ),
    (
        "services/eligibility/src/spends.rs",
        "redemption_spends",
        "UPDATE redemption_spends SET due = 0",
        "at start: spends due before the command outbox carried them are handed to it, in every tenant",
    ),
    (
        "services/gateway/src/keys.rs",
        "api_keys",
        "SELECT COUNT(*) FROM api_keys",
        "at start: whether any key exists yet (the bootstrap admin key is made only on an empty table)",
    ),
    (
        "services/wallet/src/ledger/lots.rs",
        "lots",
        "SELECT id, remaining, expires_at FROM lots {filter}",
        "`query_lots`: its callers' filters start `WHERE tenant_id = $1`",
    ),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The sources to scan: every service and the store, without their test modules.
fn sources() -> Vec<(String, String)> {
    let root = root();
    let mut files = Vec::new();
    for dir in ["services", "libs/store/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    files
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "tests"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable source");
            let text = match text.find("#[cfg(test)]") {
                Some(at) => text[..at].to_string(),
                None => text,
            };
            let name = p
                .strip_prefix(&root)
                .expect("under the workspace")
                .to_string_lossy()
                .replace('\\', "/");
            (name, text)
        })
        .collect()
}

/// The contents of the string literals of `text` (`\` + newline continuations joined),
/// with the line each starts on.
fn literals(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    let mut line = 1;
    while let Some((_, c)) = chars.next() {
        match c {
            '\n' => line += 1,
            // A char literal holding a quote, or a lifetime: skip it.
            '\'' => {
                if let Some(&(_, '"')) = chars.peek() {
                    chars.next();
                }
            }
            '/' if matches!(chars.peek(), Some(&(_, '/'))) => {
                for (_, c) in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            '"' => {
                let start = line;
                let mut s = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some((_, '\n')) => {
                                line += 1;
                                while matches!(chars.peek(), Some(&(_, ' ' | '\t'))) {
                                    chars.next();
                                }
                                s.push(' ');
                            }
                            Some((_, c)) => s.push(c),
                            None => break,
                        },
                        '\n' => {
                            line += 1;
                            s.push('\n');
                        }
                        c => s.push(c),
                    }
                }
                out.push((start, s));
            }
            _ => {}
        }
    }
    out
}

fn words(sql: &str) -> Vec<&str> {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect()
}

/// The tables with a `tenant_id` column, from the migrations' `table("name", vec![…])`.
fn tenant_tables(sources: &[(String, String)]) -> BTreeSet<String> {
    let mut tables = BTreeSet::new();
    for (_, text) in sources {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("table(") {
            rest = &rest[at + "table(".len()..];
            let head = rest.trim_start();
            let Some(name) = head
                .strip_prefix('"')
                .and_then(|h| h.split('"').next())
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            let columns = head.find("vec![").map(|v| &head[v..]);
            if let Some(columns) = columns {
                let end = columns.find(']').unwrap_or(columns.len());
                if columns[..end].contains("\"tenant_id\"") {
                    tables.insert(name.to_string());
                }
            }
        }
    }
    tables
}

#[test]
fn every_statement_on_a_tenant_table_binds_the_tenant() {
    let sources = sources();
    let tables = tenant_tables(&sources);
    for expected in [
        "accounts",
        "redemptions",
        "codes",
        "deliveries",
        "work_queue",
    ] {
        assert!(
            tables.contains(expected),
            "{expected} not found: {tables:?}"
        );
    }
    let mut unscoped = Vec::new();
    let mut allowed_used = BTreeSet::new();
    let mut statements = 0;
    for (file, text) in &sources {
        for (line, sql) in literals(text) {
            let w = words(&sql);
            if !w
                .iter()
                .any(|k| matches!(*k, "SELECT" | "UPDATE" | "DELETE" | "INSERT"))
            {
                continue;
            }
            let touched: BTreeSet<&str> = w
                .windows(2)
                .filter(|p| matches!(p[0], "FROM" | "UPDATE" | "INTO" | "JOIN"))
                .map(|p| p[1])
                .filter(|t| tables.contains(*t))
                .collect();
            if touched.is_empty() {
                continue;
            }
            statements += 1;
            if w.contains(&"tenant_id") {
                continue;
            }
            for table in touched {
                let allowed = ACROSS_TENANTS.iter().position(|(f, t, start, _)| {
                    f == file && *t == table && sql.trim_start().starts_with(start)
                });
                match allowed {
                    Some(i) => {
                        allowed_used.insert(i);
                    }
                    None => unscoped.push(format!("{file}:{line} ({table}): {}", sql.trim())),
                }
            }
        }
    }
    assert!(statements > 300, "only {statements} statements found");
    assert!(
        unscoped.is_empty(),
        "statements on tenant tables without `tenant_id`:\n{}",
        unscoped.join("\n")
    );
    let stale: Vec<_> = (0..ACROSS_TENANTS.len())
        .filter(|i| !allowed_used.contains(i))
        .map(|i| ACROSS_TENANTS[i])
        .collect();
    assert!(stale.is_empty(), "exceptions no longer needed: {stale:?}");
}

#[test]
fn the_scan_sees_a_statement_without_the_tenant() {
    let text = "fn f() { q(\"SELECT id FROM accounts \\\n  WHERE id = $1\"); q(\"SELECT 1 FROM accounts WHERE tenant_id = $1\"); }";
    let lits = literals(text);
    assert_eq!(lits.len(), 2);
    assert_eq!(
        lits[0],
        (1, "SELECT id FROM accounts  WHERE id = $1".to_string())
    );
    assert!(!words(&lits[0].1).contains(&"tenant_id"));
    assert!(words(&lits[1].1).contains(&"tenant_id"));
}

/// Every reason a service answers with (`with_reason("…")` in the sources) is explained in
/// `docs/errors.md`.
#[test]
fn every_reason_is_documented() {
    let doc = std::fs::read_to_string(root().join("docs/errors.md")).expect("docs/errors.md");
    let mut missing = BTreeSet::new();
    let mut found = 0;
    for (file, text) in &sources() {
        for (at, _) in text.match_indices("with_reason(") {
            let rest = text[at + "with_reason(".len()..].trim_start();
            let Some(reason) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                continue;
            };
            found += 1;
            if !doc.contains(&format!("`{reason}`")) {
                missing.insert(format!("{reason} ({file})"));
            }
        }
    }
    assert!(found > 30, "only {found} reasons found");
    assert!(
        missing.is_empty(),
        "reasons not in docs/errors.md: {missing:?}"
    );
}
