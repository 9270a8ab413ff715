//! Processes run inside a running container with `runc exec`: what
//! `kubectl exec` and exec probes use.
//!
//! Without a terminal the process gets pipes. With one, runc is given the
//! agent's end of a fresh pseudo-terminal as its stdio: runc then makes the
//! container's own terminal and copies between the two, and it resizes the
//! inner one from ours when it gets `SIGWINCH` (how runc's foreground
//! terminal mode works). The agent keeps the pty's master side.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;

use rustix::termios::Winsize;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use wasmkube_runtime::{Error as RuntimeError, Exec, ExecProcess};

/// Starts processes in one container.
#[derive(Debug)]
pub(crate) struct RuncExec {
    pub runc: PathBuf,
    pub state: PathBuf,
    pub id: String,
}

fn setup(what: &str) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Setup(format!("exec: {what}: {e}"))
}

/// A new pseudo-terminal: (master, slave).
pub(crate) fn pty() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(|e| setup("openpt")(e.into()))?;
    grantpt(&master).map_err(|e| setup("grantpt")(e.into()))?;
    unlockpt(&master).map_err(|e| setup("unlockpt")(e.into()))?;
    let name = ptsname(&master, Vec::new()).map_err(|e| setup("ptsname")(e.into()))?;
    let slave = {
        use std::os::unix::fs::OpenOptionsExt;
        // Opened without becoming the agent's controlling terminal.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(name.to_string_lossy().as_ref())
            .map_err(setup("open the terminal"))?
    };
    Ok((master, slave.into()))
}

pub(crate) fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[async_trait::async_trait]
impl Exec for RuncExec {
    async fn exec(
        &self,
        command: &[String],
        tty: Option<(u16, u16)>,
    ) -> Result<ExecProcess, RuntimeError> {
        if command.is_empty() {
            return Err(RuntimeError::Config("exec: no command given".into()));
        }
        let mut cmd = tokio::process::Command::new(&self.runc);
        cmd.arg("--root").arg(&self.state).arg("exec");
        if tty.is_some() {
            cmd.arg("--tty");
        }
        cmd.arg(&self.id).args(command).kill_on_drop(true);
        let Some((cols, rows)) = tty else {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(setup("runc"))?;
            let stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            return Ok(ExecProcess {
                stdin: Box::pin(stdin.compat_write()),
                stdout: Box::pin(stdout.compat()),
                stderr: Some(Box::pin(stderr.compat())),
                resize: Box::new(|_, _| {}),
                exit: Box::pin(async move {
                    let status = child.wait().await.map_err(setup("waiting for runc"))?;
                    Ok(exit_code(status))
                }),
            });
        };
        let (master, slave) = pty()?;
        // runc sizes the container's terminal from ours as it starts.
        if cols > 0 && rows > 0 {
            let _ = rustix::termios::tcsetwinsize(&master, winsize(cols, rows));
        }
        let slave_out = slave.try_clone().map_err(setup("dup"))?;
        let slave_err = slave.try_clone().map_err(setup("dup"))?;
        cmd.stdin(Stdio::from(slave))
            .stdout(Stdio::from(slave_out))
            .stderr(Stdio::from(slave_err));
        let mut child = cmd.spawn().map_err(setup("runc"))?;
        // The slave's copies went to runc with the command; only runc holds
        // the terminal now, so reads end when it exits.
        drop(cmd);
        let pid = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32));
        let resize_fd = master.try_clone().map_err(setup("dup"))?;
        let writer = master.try_clone().map_err(setup("dup"))?;
        let reader = tokio::fs::File::from_std(std::fs::File::from(master));
        let writer = tokio::fs::File::from_std(std::fs::File::from(writer));
        Ok(ExecProcess {
            stdin: Box::pin(writer.compat_write()),
            stdout: Box::pin(PtyReader(reader).compat()),
            stderr: None,
            resize: Box::new(move |cols, rows| {
                if rustix::termios::tcsetwinsize(&resize_fd, winsize(cols, rows)).is_ok()
                    && let Some(pid) = pid
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::WINCH);
                }
            }),
            exit: Box::pin(async move {
                let status = child.wait().await.map_err(setup("waiting for runc"))?;
                Ok(exit_code(status))
            }),
        })
    }
}

/// The master side of a pty reads `EIO` once the last slave is closed:
/// that is its end of file.
pub(crate) struct PtyReader(pub(crate) tokio::fs::File);

impl tokio::io::AsyncRead for PtyReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e))
                if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) =>
            {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}
