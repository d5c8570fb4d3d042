//! The library's error type. Every variant carries enough context (file, line, key, field)
//! for the message alone to tell the user what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed at the OS level. The OS error is part of this message
    /// and deliberately not a `source`: chained printing (`{:#}`) would repeat it.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    /// A file exists but its contents are not what the format requires.
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    /// One record of a dataset is malformed (line numbers start at 1).
    #[error("{path}:{line}: {detail}")]
    Data {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    /// A configuration key or command-line value is missing, unknown or out of range.
    #[error("config key `{key}`: {detail}")]
    Config { key: String, detail: String },
    /// A command-line option's value is out of range or conflicts with another option.
    #[error("{flag}: {detail}")]
    Flag { flag: String, detail: String },
    /// The model and something applied to it (an adapter, a target list) do not fit.
    #[error("{0}")]
    Model(String),
    /// Training stopped because the run itself went wrong (e.g. a NaN loss).
    #[error("{0}")]
    Training(String),
    /// A signal (SIGINT, SIGTERM) stopped the run; a checkpoint was written.
    #[error("{detail}")]
    Interrupted { signal: i32, detail: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
    pub fn format(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            detail: detail.into(),
        }
    }
    pub fn data(path: impl Into<PathBuf>, line: usize, detail: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            line,
            detail: detail.into(),
        }
    }
    pub fn flag(flag: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Flag { flag: flag.into(), detail: detail.into() }
    }
    pub fn config(key: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            detail: detail.into(),
        }
    }
}
