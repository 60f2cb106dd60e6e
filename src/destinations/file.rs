//! `type: file`: append one JSON object per line (`{"id","received_at","event"}`).
//!
//! # Invariants
//! - A delivery counts as done only after its line is written *and* `fdatasync`ed (and,
//!   for a file the relay created, after its directory entry is synced too).
//! - Readers never see a torn line: a write that fails half way is cut back to the last
//!   complete line, and on open a tail left without its newline by a crash is cut off
//!   (that line's delivery was never marked done, so it is written again whole).
//! - `event` is the FACEIO body exactly as received, on one line.
//!
//! # Group commit
//! One writer thread per file takes every line waiting, appends them in one write and
//! syncs once: with `concurrency` attempts in flight, one `fdatasync` covers them all
//! instead of one each. Reopening (log rotation) goes through the same queue, so it is
//! ordered with the writes and never races one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{DeliveryError, Destination, KindConfig, SetupError};
use crate::config::raw::destination_keys;
use crate::config::{DestinationConfig, KindContext};
use crate::store::Delivery;

destination_keys! {
    /// A destination with `type: file`, as written.
    RawFile {
        /// The file, relative to the config file's directory. Required.
        pub path: String,
    }
}

/// `type: file`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    /// JSON Lines file, resolved against the config directory.
    pub path: PathBuf,
}

impl KindConfig for FileConfig {
    const TYPE: &'static str = "file";
    /// Lines from concurrent attempts share one fsync (group commit).
    const DEFAULT_CONCURRENCY: usize = 16;
    type Raw = RawFile;

    fn validate(raw: RawFile, cx: &mut KindContext<'_>) -> Option<Self> {
        if raw.path.trim().is_empty() {
            cx.error(&["path"], "must not be empty");
            return None;
        }
        Some(FileConfig {
            path: cx.resolve(&raw.path),
        })
    }

    fn build(
        &self,
        _common: &DestinationConfig,
    ) -> Result<std::sync::Arc<dyn Destination>, SetupError> {
        // Opened by `acquire`, once this process owns the destination.
        Ok(std::sync::Arc::new(FileDestination::new(&self.path)))
    }

    fn summary(&self) -> String {
        format!("appends to {}", self.path.display())
    }

    fn exclusive_file(&self) -> Option<(&'static str, &Path)> {
        Some(("path", &self.path))
    }
}

/// Most lines appended with one sync.
const MAX_LINES_PER_SYNC: usize = 1024;

/// Work for a file's writer thread.
enum FileCommand {
    Append {
        line: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Reopen {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The queue to one file's writer thread; the thread ends when the last handle is
/// dropped.
struct Writer(mpsc::UnboundedSender<FileCommand>);

/// The files this process has open, by path: one writer per file. A destination rebuilt
/// by a reload (new limits, same path) takes over the running writer instead of opening
/// and repairing the file while the old writer may be in the middle of a line.
static OPEN_FILES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<Writer>>>,
> = std::sync::LazyLock::new(Default::default);

/// A JSON Lines file destination.
pub struct FileDestination {
    path: PathBuf,
    /// The writer while the file is open here (shared with an earlier destination for the
    /// same path, see [`OPEN_FILES`]). `None` until this process owns the destination
    /// ([`Destination::acquire`]): with a shared store another relay may be writing the
    /// file, and opening it repairs (cuts) a tail that relay may be in the middle of
    /// writing.
    writer: std::sync::Mutex<Option<std::sync::Arc<Writer>>>,
}

#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    received_at: String,
    event: &'a RawValue,
}

impl FileDestination {
    /// A destination for `path` that has not touched the file yet: it is opened once
    /// this process owns the destination ([`Destination::acquire`]).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            writer: std::sync::Mutex::new(None),
        }
    }

    /// Opens at once (creating it and its directory), repairs a torn last line, and
    /// starts the writer thread: for a process that owns the file.
    pub fn open(path: &Path) -> Result<Self, SetupError> {
        let me = Self::new(path);
        me.open_now()?;
        Ok(me)
    }

    /// Whether the file is open here (this process owns the destination).
    pub fn is_open(&self) -> bool {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Opens and repairs the file and starts its writer, unless already open.
    fn open_now(&self) -> Result<(), SetupError> {
        if self.is_open() || self.share_running_writer() {
            return Ok(());
        }
        let file = open_repaired(&self.path)?;
        self.start_writer(file)
    }

    /// Takes over the writer this process already runs for the same path, if any.
    fn share_running_writer(&self) -> bool {
        let open = OPEN_FILES.lock().unwrap_or_else(|p| p.into_inner());
        match open.get(&self.path).and_then(std::sync::Weak::upgrade) {
            Some(running) => {
                *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(running);
                true
            }
            None => false,
        }
    }

    /// Starts the writer thread on `file`, unless a writer runs already (then `file` is
    /// closed unused).
    fn start_writer(&self, file: File) -> Result<(), SetupError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if writer.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let thread_path = self.path.clone();
        std::thread::Builder::new()
            .name("file-writer".into())
            .spawn(move || write_loop(thread_path, file, rx))?;
        let running = std::sync::Arc::new(Writer(tx));
        OPEN_FILES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.path.clone(), std::sync::Arc::downgrade(&running));
        *writer = Some(running);
        Ok(())
    }

    async fn send(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> FileCommand,
    ) -> Result<(), DeliveryError> {
        let (reply, rx) = oneshot::channel();
        let sent = match &*self.writer.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(writer) => writer.0.send(make(reply)).is_ok(),
            None => {
                return Err(DeliveryError::retryable(
                    "the file is not open: this relay does not own the destination",
                ));
            }
        };
        if !sent {
            return Err(DeliveryError::retryable("file writer stopped"));
        }
        rx.await
            .map_err(|_| DeliveryError::retryable("file writer stopped"))?
            .map_err(|e| {
                DeliveryError::retryable(format!("cannot write {}: {e}", self.path.display()))
            })
    }
}

/// The writer thread: batch, append, sync once, answer everyone.
fn write_loop(path: PathBuf, mut file: File, mut rx: mpsc::UnboundedReceiver<FileCommand>) {
    let mut buf = Vec::new();
    let mut waiting: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                FileCommand::Append { line, reply } => {
                    buf.extend_from_slice(&line);
                    waiting.push(reply);
                }
                FileCommand::Reopen { reply } => {
                    flush(&mut file, &mut buf, &mut waiting);
                    let result = open_repaired(&path).map(|fresh| file = fresh);
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
            }
            if waiting.len() < MAX_LINES_PER_SYNC {
                next = rx.try_recv().ok();
            }
        }
        flush(&mut file, &mut buf, &mut waiting);
    }
}

/// Appends `buf` and syncs; on failure cuts the file back so no partial line stays.
fn flush(
    file: &mut File,
    buf: &mut Vec<u8>,
    waiting: &mut Vec<oneshot::Sender<Result<(), String>>>,
) {
    if waiting.is_empty() {
        return;
    }
    let result = append_synced(file, buf).map_err(|e| e.to_string());
    for reply in waiting.drain(..) {
        let _ = reply.send(result.clone());
    }
    buf.clear();
}

fn open_repaired(path: &Path) -> Result<File, SetupError> {
    let parent = |p: &Path| -> PathBuf {
        match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let dir = parent(path);
    // Directories about to be created: each one's entry lives in its own parent.
    let created: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(&dir).map_err(|error| SetupError::File {
        action: "cannot create",
        path: dir.clone(),
        error,
    })?;
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|error| SetupError::File {
            action: "cannot open",
            path: path.to_path_buf(),
            error,
        })?;
    // The file's name (and any new directory's) must be durable too, or its first synced
    // lines could vanish with it in a power cut. Synced on every open (start and
    // rotation only): a file created by a run that crashed before syncing is covered.
    sync_dir(&dir)?;
    for d in &created {
        sync_dir(&parent(d))?;
    }
    let keep = complete_length(&mut file).map_err(|error| SetupError::File {
        action: "cannot read",
        path: path.to_path_buf(),
        error,
    })?;
    let len = file.metadata()?.len();
    if keep < len {
        tracing::warn!(path = %path.display(), cut = len - keep, "cut a torn last line left by a crash");
        file.set_len(keep)?;
        file.sync_data()?;
    }
    Ok(file)
}

/// Syncs a directory's entries. A filesystem that cannot sync directories (EINVAL) has
/// nothing more to offer, and is not an error.
fn sync_dir(dir: &Path) -> Result<(), SetupError> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(error) if error.kind() != std::io::ErrorKind::InvalidInput => Err(SetupError::File {
            action: "cannot sync directory",
            path: dir.to_path_buf(),
            error,
        }),
        _ => Ok(()),
    }
}

/// Length of the file up to and including its last newline.
fn complete_length(file: &mut File) -> std::io::Result<u64> {
    const CHUNK: u64 = 8192;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Appends `line` and syncs it; on failure cuts the file back so no partial line stays.
fn append_synced(file: &mut File, line: &[u8]) -> std::io::Result<()> {
    let before = file.metadata()?.len();
    let result = file.write_all(line).and_then(|()| file.sync_data());
    if result.is_err() {
        let _ = file.set_len(before);
    }
    result
}

#[async_trait]
impl Destination for FileDestination {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn deliver(&self, delivery: &Delivery) -> Result<(), DeliveryError> {
        let text = std::str::from_utf8(&delivery.body)
            .map_err(|_| DeliveryError::permanent("stored payload is not UTF-8"))?;
        // Whitespace in the body may include newlines (a pretty-printed payload); inside
        // valid JSON a raw CR or LF can only be whitespace, so blank them to keep one line.
        let flat: String = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        let event = RawValue::from_string(flat)
            .map_err(|e| DeliveryError::permanent(format!("stored payload is not JSON: {e}")))?;
        let at = UNIX_EPOCH + Duration::from_millis(delivery.received_at_ms.max(0) as u64);
        let mut line = serde_json::to_vec(&Line {
            id: &delivery.event_id,
            received_at: humantime::format_rfc3339_millis(at).to_string(),
            event: &event,
        })
        .map_err(|e| DeliveryError::permanent(e.to_string()))?;
        line.push(b'\n');
        self.send(|reply| FileCommand::Append { line, reply }).await
    }

    async fn reopen(&self) -> Result<(), DeliveryError> {
        // Not open here: another relay owns the file; reopening would repair it under
        // that relay's writes.
        if !self.is_open() {
            return Ok(());
        }
        self.send(|reply| FileCommand::Reopen { reply }).await
    }

    async fn acquire(&self) -> Result<(), SetupError> {
        if self.is_open() || self.share_running_writer() {
            return Ok(());
        }
        // Opening, syncing directories and repairing block: off the runtime's threads.
        let path = self.path.clone();
        let file = tokio::task::spawn_blocking(move || open_repaired(&path))
            .await
            .map_err(|error| SetupError::OpenTask {
                path: self.path.clone(),
                error,
            })??;
        self.start_writer(file)
    }

    async fn release(&self) {
        // Lines already queued are still written and synced by the writer thread, which
        // then ends and closes the file.
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(id: &str) -> Delivery {
        Delivery {
            id: 1,
            event_id: id.into(),
            destination: "audit".into(),
            attempts: 0,
            received_at_ms: 1_764_230_400_000,
            body: Bytes::from_static(br#"{"eventName":"AUTH","facialId":"f","extra":{"k":[1,2]}}"#),
            claim: None,
        }
    }

    #[tokio::test]
    async fn appends_one_json_object_per_line_with_the_original_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/events.jsonl");
        let dest = FileDestination::open(&path).unwrap();
        dest.deliver(&delivery("a")).await.unwrap();
        dest.deliver(&delivery("b")).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["id"], "b");
        assert_eq!(lines[0]["event"]["extra"]["k"][1], 2);
        assert!(
            lines[0]["received_at"]
                .as_str()
                .unwrap()
                .starts_with("2025-11-27T")
        );
    }

    #[tokio::test]
    async fn a_pretty_printed_event_stays_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let dest = FileDestination::open(&path).unwrap();
        let mut d = delivery("p");
        d.body = Bytes::from_static(b"{\r\n  \"eventName\": \"AUTH\",\n  \"note\": \"a\\nb\"\n}");
        dest.deliver(&d).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(
            line["event"]["note"], "a\nb",
            "escaped newlines inside strings survive"
        );
    }

    #[tokio::test]
    async fn concurrent_appends_each_get_a_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let dest = std::sync::Arc::new(FileDestination::open(&path).unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let dest = std::sync::Arc::clone(&dest);
                tokio::spawn(async move { dest.deliver(&delivery(&format!("e{i}"))).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 200, "every delivery written once, whole");
    }

    #[tokio::test]
    async fn a_rebuilt_destination_takes_over_the_running_writer_instead_of_repairing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let running = FileDestination::open(&path).unwrap();
        running.deliver(&delivery("first")).await.unwrap();
        // The running writer is in the middle of a line (its write is not finished):
        // a second open would take that for a crash's torn tail and cut it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"half").unwrap();
        // A reload rebuilds the destination (same path, other limits) while the old one
        // still runs.
        let rebuilt = FileDestination::new(&path);
        rebuilt.acquire().await.unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(
            now.ends_with("{\"id\":\"half"),
            "the running writer's line was cut: {now}"
        );
        f.write_all(b"\"}\n").unwrap();
        rebuilt.deliver(&delivery("second")).await.unwrap();
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        drop(running);
    }

    #[tokio::test]
    async fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let dest = FileDestination::open(&path).unwrap();
        dest.deliver(&delivery("before")).await.unwrap();
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).unwrap();
        dest.reopen().await.unwrap();
        dest.deliver(&delivery("after")).await.unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(
            now.contains("\"after\"") && !now.contains("\"before\""),
            "{now}"
        );
    }

    #[test]
    fn a_torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"id\":\"a\"}\n{\"id\":\"b\",\"ev").unwrap();
        let dest = FileDestination::open(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"id\":\"a\"}\n");
        // Closed (a crash, a restart): the next open repairs again.
        drop(dest);

        std::fs::write(&path, "no newline at all").unwrap();
        let _dest = FileDestination::open(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
