//! A container's terminal (`tty: true`), kept by the agent for either
//! runtime: a pseudo-terminal whose slave end is the container's stdin,
//! stdout and stderr, and whose master end one task of the agent owns.
//!
//! runc, in its foreground terminal mode, copies between the slave end and
//! the terminal it makes inside the container; a Wasm guest reads and
//! writes the slave end as WASI stdio that reports a terminal. On the
//! master side, what the container writes goes to its log as one stream
//! (as the kubelet logs a container with a terminal); what `kubectl attach
//! -i` sends (the run's stdin pipe) is typed in, and the end of a
//! `stdinOnce` attach is typed as end-of-file (^D); `kubectl attach -t`
//! resizes it. When the run ends, the task reads what is left and closes
//! the master end, so anything still reading the slave end wakes.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};

use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};

/// What a terminal's task reads at once.
const CHUNK: usize = 16 * 1024;

/// The agent's side of a container's terminal.
#[derive(Debug)]
pub(crate) struct Terminal {
    master: Weak<AsyncFd<OwnedFd>>,
    ended: Arc<Notify>,
}

/// The slave end for the container's stdin, stdout and stderr.
pub(crate) struct Ends {
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

impl Terminal {
    /// A new terminal whose output goes to `log` and whose input is read
    /// from `input` (the run's stdin pipe, if it has one).
    pub(crate) fn open(
        log: Arc<dyn wasmkube_runtime::LogSink>,
        input: Option<File>,
    ) -> std::io::Result<(Self, Ends)> {
        let (master, slave) = pty()?;
        rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK)?;
        // SAFETY: an `OwnedFd` keeps its one descriptor open, unchanged,
        // for as long as it lives, and the `AsyncFd` owns it.
        #[allow(unsafe_code)]
        let master = Arc::new(unsafe { AsyncFd::register(master)? });
        let ended = Arc::new(Notify::new());
        let (typed, keys) = mpsc::channel(16);
        if let Some(input) = input {
            let input = tokio::net::unix::pipe::Receiver::from_file(input)?;
            tokio::spawn(read_input(input, typed));
        }
        let terminal = Self {
            master: Arc::downgrade(&master),
            ended: ended.clone(),
        };
        tokio::spawn(run(master, log, keys, ended));
        let ends = Ends {
            stdin: File::from(slave.try_clone()?),
            stdout: File::from(slave.try_clone()?),
            stderr: File::from(slave),
        };
        Ok((terminal, ends))
    }

    /// Sets the terminal's size (columns, rows); the runtime then tells the
    /// container, if it can.
    pub(crate) fn set_size(&self, cols: u16, rows: u16) {
        if let Some(master) = self.master.upgrade() {
            let size = rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let _ = rustix::termios::tcsetwinsize(master.get_ref(), size);
        }
    }

    /// The run ended: the rest of its output is logged, then the terminal
    /// closes.
    pub(crate) fn end(&self) {
        self.ended.notify_one();
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.end();
    }
}

/// Input for the terminal: bytes, or `None` for end-of-file.
type Keys = mpsc::Receiver<Option<Vec<u8>>>;

/// Reads the run's stdin pipe into the terminal; its end (a `stdinOnce`
/// attach ended) is end-of-file.
async fn read_input(
    mut input: tokio::net::unix::pipe::Receiver,
    typed: mpsc::Sender<Option<Vec<u8>>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0; CHUNK];
    loop {
        let next = match input.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(buf[..n].to_vec()),
        };
        let done = next.is_none();
        if typed.send(next).await.is_err() || done {
            return;
        }
    }
}

/// The terminal's task: output to the log, input typed in, until the run
/// ends (or its last slave end closes).
async fn run(
    master: Arc<AsyncFd<OwnedFd>>,
    log: Arc<dyn wasmkube_runtime::LogSink>,
    mut keys: Keys,
    ended: Arc<Notify>,
) {
    let mut buf = vec![0; CHUNK];
    let mut pending: Vec<u8> = Vec::new();
    let mut input_open = true;
    loop {
        tokio::select! {
            readable = master.readable() => {
                let Ok(mut guard) = readable else { break };
                match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut buf)?)) {
                    // EIO: every slave end closed (runc exited).
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => log.write(&buf[..n]),
                    Err(_would_block) => {}
                }
            }
            writable = master.writable(), if !pending.is_empty() => {
                let Ok(mut guard) = writable else { break };
                if let Ok(Ok(n)) = guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), &pending)?)) {
                    pending.drain(..n);
                }
            }
            key = keys.recv(), if input_open && pending.is_empty() => match key {
                Some(Some(bytes)) => pending = bytes,
                // End-of-file, as a terminal's user types it.
                Some(None) => {
                    pending = vec![0x04];
                    input_open = false;
                }
                None => input_open = false,
            },
            () = ended.notified() => {
                // The run ended: what it wrote before is still to read.
                while let Ok(n) = rustix::io::read(master.get_ref(), &mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.write(&buf[..n]);
                }
                break;
            }
        }
    }
}

/// A new pseudo-terminal: (master, slave).
fn pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without becoming the agent's controlling terminal.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(name.to_string_lossy().as_ref())?;
    Ok((master, slave.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[derive(Debug, Default)]
    struct Collected(std::sync::Mutex<Vec<u8>>);

    impl wasmkube_runtime::LogSink for Collected {
        fn write(&self, bytes: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(bytes);
        }
    }

    /// Input typed in reaches the slave end (echoed, as a terminal does),
    /// its end is end-of-file to a reader, and output reaches the log.
    #[tokio::test]
    async fn input_reaches_the_container_and_output_the_log() {
        let log = Arc::new(Collected::default());
        let (pipe_out, pipe_in) = std::io::pipe().unwrap();
        let (terminal, ends) =
            Terminal::open(log.clone(), Some(File::from(OwnedFd::from(pipe_out)))).unwrap();
        let Ends {
            mut stdin,
            mut stdout,
            stderr,
        } = ends;
        drop(stderr);
        let mut pipe_in = File::from(OwnedFd::from(pipe_in));
        pipe_in.write_all(b"typed\n").unwrap();
        drop(pipe_in);
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            let mut one = [0u8; 1];
            // A canonical-mode read returns a line, then 0 at ^D.
            while let Ok(1) = stdin.read(&mut one) {
                line.push(one[0] as char);
            }
            line
        });
        stdout.write_all(b"hello\n").unwrap();
        let line = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(line, "typed\n");
        drop(stdout);
        // The echo of the input and the output, with the terminal's CRLF.
        // The kernel moves both to the master end on its own time (the
        // echo may come after the reader has its line), so the log is
        // waited on for both.
        let logged = || String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
        let both = || logged().contains("typed\r\n") && logged().contains("hello\r\n");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !both() && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert!(both(), "{}", logged());
        // After the run ends, the terminal's task closes the master end.
        terminal.end();
        let closed = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while terminal.master.upgrade().is_some() && std::time::Instant::now() < closed {
            tokio::task::yield_now().await;
        }
        assert!(terminal.master.upgrade().is_none(), "the master end closed");
    }
}
