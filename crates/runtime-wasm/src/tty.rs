//! A guest on a terminal (`tty: true`): its stdio is the slave end of the
//! agent's terminal, and WASI says so (`wasi:cli/terminal-*`; a preview 1
//! module sees character devices, so `isatty` is true). The terminal does
//! the rest: echo, line editing, end-of-file at ^D. A guest has no signal
//! to learn of a resize by.

use wasmtime_wasi::cli::{IsTerminal, StdinStream, StdoutStream};
use wasmtime_wasi::p2::{InputStream, OutputStream};

/// A WASI stdio stream that reports a terminal.
pub(crate) struct OnTerminal<T>(pub T);

impl<T> IsTerminal for OnTerminal<T> {
    fn is_terminal(&self) -> bool {
        true
    }
}

impl<T: StdinStream> StdinStream for OnTerminal<T> {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        self.0.async_stream()
    }

    fn p2_stream(&self) -> Box<dyn InputStream> {
        self.0.p2_stream()
    }
}

impl<T: StdoutStream> StdoutStream for OnTerminal<T> {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        self.0.async_stream()
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        self.0.p2_stream()
    }
}
