//! One file of the state directory that the running router rewrites, and the turns its
//! writers take.

use serde::Serialize;

use super::{Error, StateDir};

/// A JSON file of the state directory that the running router rewrites as its state changes.
///
/// Writers take turns on the file's own lock, and each takes its snapshot once it has its
/// turn, so the file always ends with the newest state. The write (temporary file, fsync,
/// rename) runs on tokio's blocking pool; the owner's state lock is taken only inside the
/// snapshot closure, never across the write, and nothing but this file's writers waits on its
/// turn.
#[derive(Debug)]
pub struct StateFile {
    state: StateDir,
    name: String,
    turn: tokio::sync::Mutex<()>,
}

impl StateFile {
    /// The file `name` of `state`.
    #[must_use]
    pub fn new(state: &StateDir, name: impl Into<String>) -> Self {
        Self {
            state: state.clone(),
            name: name.into(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes what `snapshot` returns, taken once this writer has its turn.
    ///
    /// # Errors
    /// When writing fails; the file then holds what it held before.
    pub async fn write<T, F>(&self, snapshot: F) -> Result<(), Error>
    where
        F: FnOnce() -> T,
        T: Serialize + Send + 'static,
    {
        let _turn = self.turn.lock().await;
        let value = snapshot();
        let (state, name) = (self.state.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || state.write_json(&name, &value))
            .await
            .map_err(|e| Error::Io {
                path: self.state.file(&self.name),
                source: std::io::Error::other(e),
            })?
    }
}
