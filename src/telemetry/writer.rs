//! The log writer: lines are formatted on the thread that logs and appended to one
//! buffer; one thread writes the buffer to stderr, many lines per `write(2)`.
//!
//! Why not a channel to a writer thread (tracing-appender's non-blocking writer, used
//! before): every line sent to a sleeping writer costs a futex wake-up and a context
//! switch, two per event at low rates (an event's "accepted" and "delivered" lines),
//! which profiling at 100–1,000 events/s found among the largest fixed costs per event.
//!
//! The invariants:
//! - **Nothing is dropped.** Past [`MAX_PENDING`] bytes waiting (stderr blocked), a
//!   logger waits for the writer, as it would on a blocking `write(2)`.
//! - **A line after a quiet spell is written at once**: the writer sleeps until the
//!   first line wakes it. After each write it waits [`LINGER`] for more lines before it
//!   writes again; loggers do not wake it during that wait (no syscall per line), so
//!   while lines keep coming the writer wakes at most once per [`LINGER`], and a line
//!   waits at most that long. A wait that finds nothing puts it back to sleep. Past
//!   [`FLUSH_AT`] bytes waiting, a logger wakes it at once.
//! - **Dropping the [`WriterGuard`] writes every pending line** (waiting up to
//!   [`CLOSE_WAIT`] for a stderr that does not take them); lines logged after that are
//!   written by the logger itself. A `kill -9` loses the lines of the last [`LINGER`].

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Longest a line waits in the buffer while lines keep coming.
pub const LINGER: Duration = Duration::from_millis(20);
/// Bytes waiting that make a logger wake the writer at once.
pub const FLUSH_AT: usize = 64 * 1024;
/// Bytes waiting past which loggers wait for the writer.
pub const MAX_PENDING: usize = 4 * 1024 * 1024;
/// Longest the guard's drop waits for the last lines to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Sizes and timing of a writer (the constants above, smaller in tests).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub linger: Duration,
    pub flush_at: usize,
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            linger: LINGER,
            flush_at: FLUSH_AT,
            max_pending: MAX_PENDING,
        }
    }
}

struct State {
    buf: Vec<u8>,
    /// The writer waits for a wake-up (not a timeout): the next line must wake it.
    asleep: bool,
    /// A logger asked for a write before the linger ends (the buffer passed `flush_at`).
    urgent: bool,
    /// The guard was dropped: the writer writes what is left and ends.
    closed: bool,
    /// The writer thread has ended.
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer.
    writer: Condvar,
    /// Wakes loggers waiting for room, and the guard waiting for the end.
    room: Condvar,
    limits: Limits,
}

impl Shared {
    /// `ended`: no writer thread; loggers write their own lines.
    fn new(limits: Limits, ended: bool) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                buf: Vec::with_capacity(if ended { 0 } else { limits.flush_at }),
                asleep: false,
                urgent: false,
                closed: ended,
                done: ended,
            }),
            writer: Condvar::new(),
            room: Condvar::new(),
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The handle loggers write through (a `tracing_subscriber` `MakeWriter`).
pub struct LogWriter<W: Write + Send + 'static> {
    shared: Arc<Shared>,
    /// Where lines go once the writer thread has ended.
    direct: fn() -> W,
}

impl<W: Write + Send + 'static> Clone for LogWriter<W> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            direct: self.direct,
        }
    }
}

/// Ends the writer thread when dropped, after it has written every pending line.
#[must_use = "dropping the guard stops the log writer"]
pub struct WriterGuard {
    shared: Arc<Shared>,
}

/// Starts the writer thread, writing to `out` (made once, on that thread); `direct`
/// makes a writer for lines logged after the guard is dropped.
pub fn start<W: Write + Send + 'static>(
    name: &str,
    limits: Limits,
    out: impl FnOnce() -> W + Send + 'static,
    direct: fn() -> W,
) -> std::io::Result<(LogWriter<W>, WriterGuard)> {
    let shared = Shared::new(limits, false);
    let thread = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            write_loop(&thread, out());
            thread.room.notify_all();
        })?;
    let guard = WriterGuard {
        shared: Arc::clone(&shared),
    };
    Ok((LogWriter { shared, direct }, guard))
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let limits = shared.limits;
    let mut spare = Vec::with_capacity(limits.flush_at);
    let mut lingering = false;
    loop {
        let mut state = shared.lock();
        if lingering {
            // Lines that come now wait for the timeout, without a wake-up each.
            state = shared
                .writer
                .wait_timeout_while(state, limits.linger, |s| !s.closed && !s.urgent)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        while state.buf.is_empty() {
            if state.closed {
                // Under the same lock as the check: a line logged from here on is
                // written by its logger, never left in the buffer.
                state.done = true;
                return;
            }
            // Quiet: sleep until a line comes, and write that one at once.
            state.asleep = true;
            state = shared.writer.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.asleep = false;
        state.urgent = false;
        let was_full = state.buf.len() >= limits.max_pending;
        std::mem::swap(&mut state.buf, &mut spare);
        drop(state);
        if was_full {
            shared.room.notify_all();
        }
        // A stderr that fails (closed) loses these lines whatever is done: go on, so
        // loggers never wait for room that will not come.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if spare.capacity() > 4 * limits.flush_at {
            spare.shrink_to(limits.flush_at);
        }
        lingering = true;
    }
}

impl<W: Write + Send + 'static> LogWriter<W> {
    /// A writer without a thread: each logger writes its own line.
    pub fn direct(direct: fn() -> W) -> Self {
        let shared = Shared::new(Limits::default(), true);
        Self { shared, direct }
    }

    fn append(&self, line: &[u8]) -> std::io::Result<()> {
        let shared = &*self.shared;
        let limits = shared.limits;
        let state = shared.lock();
        let mut state = shared
            .room
            .wait_while(state, |s| s.buf.len() >= limits.max_pending && !s.done)
            .unwrap_or_else(|p| p.into_inner());
        if state.done {
            drop(state);
            return (self.direct)().write_all(line);
        }
        state.buf.extend_from_slice(line);
        if state.asleep {
            state.asleep = false;
            shared.writer.notify_one();
        } else if state.buf.len() >= limits.flush_at && !state.urgent {
            state.urgent = true;
            shared.writer.notify_one();
        }
        Ok(())
    }
}

/// One log line as `tracing_subscriber`'s formatter writes it (a single `write_all`).
pub struct Line<'a, W: Write + Send + 'static>(&'a LogWriter<W>);

impl<W: Write + Send + 'static> Write for Line<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.append(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let shared = &*self.shared;
        let mut state = shared.lock();
        state.closed = true;
        shared.writer.notify_one();
        let _ = shared
            .room
            .wait_timeout_while(state, CLOSE_WAIT, |s| !s.done)
            .unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// A sink that reports each `write_all` it gets.
    struct Reported(mpsc::Sender<Vec<u8>>);

    impl Write for Reported {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(w: &LogWriter<impl Write + Send + 'static>, line: &str) {
        use tracing_subscriber::fmt::MakeWriter;
        w.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn a_line_after_a_quiet_spell_is_written_at_once_and_the_rest_on_close() {
        let (tx, rx) = mpsc::channel();
        let limits = Limits {
            linger: Duration::from_secs(3600),
            ..Limits::default()
        };
        let (w, guard) = start("t", limits, move || Reported(tx), || unreachable!()).unwrap();
        log(&w, "first\n");
        // Written without waiting for the (hour-long) linger.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            b"first\n"
        );
        // Lines during the linger wait for it, or for the guard's drop.
        log(&w, "second\n");
        log(&w, "third\n");
        assert!(rx.try_recv().is_err(), "written before the linger ended");
        drop(guard);
        let rest: Vec<u8> = rx.try_iter().flatten().collect();
        assert_eq!(rest, b"second\nthird\n");
    }

    #[test]
    fn a_full_buffer_wakes_the_writer_before_the_linger_ends() {
        let (tx, rx) = mpsc::channel();
        let limits = Limits {
            linger: Duration::from_secs(3600),
            flush_at: 16,
            max_pending: 1024,
        };
        let (w, _guard) = start("t", limits, move || Reported(tx), || unreachable!()).unwrap();
        log(&w, "wake\n");
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        log(&w, "0123456789\n");
        log(&w, "0123456789\n");
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got, b"0123456789\n0123456789\n");
    }

    /// A sink that blocks until told to go on.
    struct Blocked(Arc<(Mutex<bool>, Condvar)>, mpsc::Sender<Vec<u8>>);

    impl Write for Blocked {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            let _ = self.1.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn loggers_wait_for_a_blocked_stderr_and_lose_nothing() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let limits = Limits {
            linger: Duration::from_millis(1),
            flush_at: 64,
            max_pending: 256,
        };
        let sink_gate = Arc::clone(&gate);
        let (w, guard) = start(
            "t",
            limits,
            move || Blocked(sink_gate, tx),
            || unreachable!(),
        )
        .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log(&w, &format!("{t} {i}\n"));
                    }
                })
            })
            .collect();
        // The buffer fills up while stderr blocks, and then the loggers wait: 12,000
        // bytes of lines cannot have gone anywhere yet.
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.shared.lock().buf.len() < limits.max_pending {
            assert!(Instant::now() < deadline, "the buffer never filled up");
            std::thread::yield_now();
        }
        assert!(threads.iter().any(|t| !t.is_finished()));
        {
            let (open, cv) = &*gate;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let all: Vec<u8> = rx.try_iter().flatten().collect();
        let text = String::from_utf8(all).unwrap();
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>(), "thread {t}'s lines");
        }
    }

    #[test]
    fn lines_after_the_guard_is_dropped_are_written_directly() {
        static DIRECT: Mutex<Vec<u8>> = Mutex::new(Vec::new());
        struct Direct;
        impl Write for Direct {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                DIRECT.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (w, guard) = start("t", Limits::default(), || Direct, || Direct).unwrap();
        log(&w, "before\n");
        drop(guard);
        log(&w, "after\n");
        assert_eq!(&*DIRECT.lock().unwrap(), b"before\nafter\n");
    }
}
