//! `deltasync-consumer` binary: parses flags, loads settings, calls the library.

fn main() -> anyhow::Result<()> {
    Ok(())
}
