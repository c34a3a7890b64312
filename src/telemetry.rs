//! Logs: human-readable by default, JSON with `--log-json`; level from `RUST_LOG` (default info).

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    // actix-http logs an ERROR line for every request it cannot parse (a bad header byte, an
    // overlong URI): a client could write the log at line rate. Those answers are its own empty
    // 400s, counted by nobody; the line is dropped unless RUST_LOG asks for it.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,actix_http::h1::dispatcher=off"));
    // Colours only for a terminal: a log file gets plain text, and no escape codes are formatted
    // into every span's fields.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    let result = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    // Already initialised (tests, embedding applications): keep theirs.
    let _ = result;
}
