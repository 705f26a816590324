//! Benchmark results: one row per scenario with our figure, the baseline's from the same run,
//! their ratio and the target; printed as a table and written to BENCHMARKS.md and JSON.

use serde::Serialize;
use std::fmt::Write as _;

/// One measured scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// Our figure, formatted with its unit.
    pub ours: String,
    /// The baseline's figure from the same run, formatted with its unit.
    pub baseline: String,
    /// The headline ratio, with what it means (e.g. "1.9× faster", "1.2% of full").
    pub ratio: String,
    /// The target, as the issue states it.
    pub target: String,
    /// Whether the target was met.
    pub met: bool,
    /// The correctness check the scenario made (digests compared, counts).
    pub check: String,
    /// Raw numbers for the JSON file.
    pub figures: serde_json::Value,
}

/// Machine and server facts printed with the table.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub command: String,
    pub date: String,
    pub machine: String,
    pub server: String,
    pub sizes: String,
}

/// The table as Markdown.
pub fn markdown(ctx: &Context, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `{}` on {} ({}), nats-server {}, sizes: {}. Each scenario ran against its \
         baseline in the same run on the same server; ratios are the headline, absolute \
         figures are noisy on a shared machine. Every scenario checks its result.\n",
        ctx.command, ctx.date, ctx.machine, ctx.server, ctx.sizes
    );
    let _ = writeln!(
        s,
        "| scenario | deltasync | baseline (same run) | ratio | target | met | check |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.ours,
            r.baseline,
            r.ratio,
            r.target,
            if r.met { "yes" } else { "**no**" },
            r.check
        );
    }
    s
}

/// The line after which BENCHMARKS.md holds hand-written notes (why a target is missed, the
/// plan): a new run replaces the table above it and keeps everything from it on.
pub const NOTES_MARKER: &str =
    "<!-- Notes below are kept when deltasync-bench rewrites the table. -->";

/// The new table followed by the notes of `existing` (the file being replaced), if it has
/// any; a file without the marker gets an empty notes section.
pub fn with_notes(table: &str, existing: Option<&str>) -> String {
    let notes = existing
        .and_then(|old| old.find(NOTES_MARKER).map(|at| &old[at..]))
        .unwrap_or(NOTES_MARKER);
    let mut out = table.trim_end().to_string();
    out.push_str("\n\n");
    out.push_str(notes.trim_end());
    out.push('\n');
    out
}

/// The table for a terminal.
pub fn print(rows: &[Row]) {
    println!(
        "{:<44} {:>22} {:>22} {:>22} {:>5}",
        "scenario", "deltasync", "baseline", "ratio", "met"
    );
    for r in rows {
        println!(
            "{:<44} {:>22} {:>22} {:>22} {:>5}",
            r.scenario,
            r.ours,
            r.baseline,
            r.ratio,
            if r.met { "yes" } else { "NO" }
        );
    }
}

/// Formats a rate with a unit prefix.
pub fn rate(per_sec: f64, unit: &str) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M {unit}/s", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1}k {unit}/s", per_sec / 1e3)
    } else {
        format!("{per_sec:.1} {unit}/s")
    }
}

/// Formats bytes.
pub fn bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Formats seconds.
pub fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_table_keeps_the_notes_and_drops_the_old_table() {
        let old = format!("# Benchmarks\n\nold table\n\n{NOTES_MARKER}\n\n## Why\n\nreasons\n");
        let out = with_notes("# Benchmarks\n\nnew table\n", Some(&old));
        assert_eq!(
            out,
            format!("# Benchmarks\n\nnew table\n\n{NOTES_MARKER}\n\n## Why\n\nreasons\n")
        );
        assert!(!out.contains("old table"));
    }

    #[test]
    fn a_file_without_notes_gets_the_marker_only() {
        for existing in [None, Some("# Benchmarks\n\nhand-edited, no marker\n")] {
            assert_eq!(
                with_notes("table\n", existing),
                format!("table\n\n{NOTES_MARKER}\n")
            );
        }
    }
}
