//! What can stop a drill before it judges anything.

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("unknown drill {name:?}; drills: {known}")]
    Unknown { name: String, known: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("setting up the drill: {0}")]
    Setup(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("writing the report: {0}")]
    Report(String),
    #[error("reading the database: {0}")]
    Evidence(String),
    #[error("the operator's lever {path} answered {status}")]
    Lever { path: String, status: u16 },
}
