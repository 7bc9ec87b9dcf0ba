//! The benchmark's error type, [`BenchError`]: a message and the chain of
//! causes that led to it, built with [`Context`] and [`bail!`]. Its `{:#}`
//! form prints the whole chain, as `main` reports it.

use std::error::Error as StdError;
use std::fmt;

/// A failed benchmark step: what was being done, and why it failed.
pub struct BenchError {
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
    context: Option<Box<BenchError>>,
}

/// The benchmark's result type.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

impl BenchError {
    /// An error with this message and no cause.
    pub fn msg(message: impl fmt::Display) -> Self {
        BenchError {
            message: message.to_string(),
            source: None,
            context: None,
        }
    }

    fn wrap(self, message: impl fmt::Display) -> Self {
        BenchError {
            message: message.to_string(),
            source: None,
            context: Some(Box::new(self)),
        }
    }
}

impl<E: StdError + Send + Sync + 'static> From<E> for BenchError {
    fn from(error: E) -> Self {
        BenchError {
            message: error.to_string(),
            source: error.source().map(|s| s.to_string().into()),
            context: None,
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if f.alternate() {
            if let Some(inner) = &self.context {
                write!(f, ": {inner:#}")?;
            }
            if let Some(source) = &self.source {
                write!(f, ": {source}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:#}")
    }
}

/// Adds what was being done to an error (or to a missing value).
pub trait Context<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl fmt::Display) -> Result<T>;
    /// Wraps the error with the context `f` makes, only on failure.
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: StdError + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| BenchError::from(e).wrap(context))
    }
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| BenchError::from(e).wrap(f()))
    }
}

impl<T> Context<T> for Result<T> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.wrap(context))
    }
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| e.wrap(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.ok_or_else(|| BenchError::msg(context))
    }
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| BenchError::msg(f()))
    }
}

/// Returns early with a [`BenchError`] made from a format string.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::BenchError::msg(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// A [`BenchError`] made from a format string.
macro_rules! bench_error {
    ($($arg:tt)*) => {
        $crate::error::BenchError::msg(format!($($arg)*))
    };
}
pub(crate) use bench_error;
