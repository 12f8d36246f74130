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

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    };

    use super::*;

    /// Writers racing each other, each after its own change: whatever order they get their
    /// turns in, the file ends with the last change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writers_leave_the_newest_state() {
        let dir = kernel_tests::TempDir::new("state-file").expect("temp dir");
        let state = StateDir::new(dir.path());
        let file = Arc::new(StateFile::new(&state, "counter.json"));
        let value = Arc::new(Mutex::new(0u64));
        let written = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..64)
            .map(|_| {
                let (file, value, written) =
                    (Arc::clone(&file), Arc::clone(&value), Arc::clone(&written));
                tokio::spawn(async move {
                    *value.lock().expect("value") += 1;
                    file.write(|| *value.lock().expect("value"))
                        .await
                        .expect("written");
                    written.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        assert_eq!(written.load(Ordering::SeqCst), 64);
        let stored: u64 = state.read_json("counter.json").expect("stored");
        assert_eq!(stored, 64);
    }

    #[tokio::test]
    async fn a_write_that_fails_says_where() {
        let state = StateDir::new("/proc/skiff-no-such-dir");
        let file = StateFile::new(&state, "x.json");
        let e = file
            .write(|| 1u8)
            .await
            .expect_err("cannot write under /proc");
        assert!(e.to_string().contains("/proc/skiff-no-such-dir"), "{e}");
    }
}
