//! Logs: human-readable by default, JSON with `--log-json`; level from `RUST_LOG` (default info).

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: a log file gets plain text, and no escape codes are formatted
    // into every span's fields.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    let result = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    // Already initialised (tests, embedding applications): keep theirs.
    let _ = result;
}
