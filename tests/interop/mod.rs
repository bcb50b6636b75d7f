//! Shared by the interop tests (`tests/interop_*.rs`, feature `interop`):
//! starting software we did not write (socat, pymodbus, mbpoll) and our own
//! binaries as real processes.
//!
//! Invariants:
//! - every process runs in its own temp dir or on a port picked by binding
//!   `127.0.0.1:0` just before, never a fixed one;
//! - every process is killed when its [`Process`] guard drops, also when a
//!   test panics;
//! - every wait is bounded and waits on the thing itself (a line on a pipe,
//!   a TCP connect, an open file descriptor, an exit), so a missing tool or
//!   a dead process fails the test with the process's stderr instead of
//!   hanging it.

// Each interop test binary includes this module and uses a different part.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use facwatch_proto::profile::{Field, RatioUse, Ratios};

/// Longest wait for a process to become ready (listening, port open).
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest run of one command-line client (`probe`, `mbpoll`).
pub(crate) const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often exit and readiness conditions without an event are checked.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// A binary of this workspace, built next to the test executable
/// (`target/<profile>/deps/<test>-<hash>` -> `target/<profile>/<name>`).
pub(crate) fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (the interop tests run the built binaries)",
        path.display()
    );
    path
}

/// Whether the tests run as root (CI's containers do): Mosquitto then
/// refuses to start unless its config says `user root`.
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0 and
/// released), for servers that take a port number rather than a socket.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipe {
    Stdout,
    Stderr,
}

/// A running child process, killed (SIGKILL) and reaped on drop. Its
/// stdout and stderr are read line by line on two threads, so it never
/// blocks on a full pipe; stderr is also kept for failure messages.
pub(crate) struct Process {
    name: String,
    child: Child,
    lines: Receiver<(Pipe, String)>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `command` with piped stdout and stderr; panics naming the
    /// program (and what installs it) if it cannot be started.
    pub(crate) fn spawn(name: &str, mut command: Command) -> Process {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({command:?}): {e}; .ci/run installs socat, mbpoll and pymodbus"
            )
        });
        let (tx, lines) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let out_tx = tx.clone();
        thread::spawn(move || forward_lines(stdout_pipe, Pipe::Stdout, out_tx, None));
        let kept = Arc::clone(&stderr);
        thread::spawn(move || forward_lines(stderr_pipe, Pipe::Stderr, tx, Some(kept)));
        Process {
            name: name.to_string(),
            child,
            lines,
            stderr,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Waits until the process writes a line on `pipe` for which `wanted`
    /// holds, and returns it; other lines are skipped (e.g. deprecation
    /// notices). Panics with the process's stderr if it exits or closes its
    /// pipes first, or after `timeout`.
    pub(crate) fn wait_for_line(
        &mut self,
        pipe: Pipe,
        timeout: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((from, line)) if from == pipe && wanted(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => self.fail(&format!(
                    "did not print the expected line on {pipe:?} within {timeout:?}"
                )),
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail("closed its output before printing the expected line")
                }
            }
        }
    }

    /// Waits until a TCP connect to `address` succeeds. Panics with the
    /// process's stderr if the process exits first, or after `timeout`.
    pub(crate) fn wait_for_tcp(&mut self, address: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&address, POLL_EVERY.max(Duration::from_millis(100)))
                .is_ok()
            {
                return;
            }
            self.check_running(deadline, &format!("accept TCP on {address}"));
        }
    }

    /// Waits until the process holds `path` (a device, followed through
    /// symlinks) open, read from `/proc/PID/fd` (Linux). Panics with the
    /// process's stderr if it exits first, or after `timeout`.
    pub(crate) fn wait_until_open(&mut self, path: &Path, timeout: Duration) {
        let target = std::fs::canonicalize(path)
            .unwrap_or_else(|e| panic!("resolving {}: {e}", path.display()));
        let fds = PathBuf::from(format!("/proc/{}/fd", self.pid()));
        let deadline = Instant::now() + timeout;
        loop {
            let open = std::fs::read_dir(&fds).into_iter().flatten().any(|entry| {
                entry
                    .ok()
                    .and_then(|e| std::fs::read_link(e.path()).ok())
                    .is_some_and(|link| link == target)
            });
            if open {
                return;
            }
            self.check_running(deadline, &format!("open {}", target.display()));
        }
    }

    /// Whether the process has exited (and how), without waiting.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit on its own; panics with its stderr
    /// after `timeout`.
    pub(crate) fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("did not exit within {timeout:?}"));
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// SIGKILL, as a power cut or the OOM killer would: no cleanup runs.
    /// Returns once the process is reaped.
    pub(crate) fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful stop), then waits up to `timeout` for the exit.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("running kill(1)");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
        self.wait_for_exit(timeout)
    }

    /// Panics if the process has exited or `deadline` has passed; else
    /// pauses one poll period.
    fn check_running(&mut self, deadline: Instant, waiting_to: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            self.fail(&format!("exited ({status}) before it would {waiting_to}"));
        }
        if Instant::now() >= deadline {
            self.fail(&format!("did not {waiting_to} in time"));
        }
        thread::sleep(POLL_EVERY);
    }

    fn fail(&mut self, problem: &str) -> ! {
        // Give the stderr thread a moment to take the last words of a
        // process that just died.
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until && self.child.try_wait().ok().flatten().is_none() {
            thread::sleep(POLL_EVERY);
        }
        thread::sleep(POLL_EVERY * 5);
        panic!("{} {problem}; its stderr:\n{}", self.name, self.stderr())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(
    pipe: impl Read,
    from: Pipe,
    tx: mpsc::Sender<(Pipe, String)>,
    keep: Option<Arc<Mutex<String>>>,
) {
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        if let Some(keep) = &keep {
            let mut kept = keep.lock().expect("stderr buffer");
            kept.push_str(&line);
            kept.push('\n');
        }
        // The receiver may be gone (test over); keep draining the pipe.
        let _ = tx.send((from, line));
    }
}

/// Two pseudo-terminals joined by socat, like the two ends of a serial
/// cable: a server opens `a`, a client opens `b`.
pub(crate) struct PtyPair {
    pub(crate) a: PathBuf,
    pub(crate) b: PathBuf,
    _socat: Process,
}

/// Starts `socat -d -d pty,raw,echo=0,link=DIR/a pty,raw,echo=0,link=DIR/b`
/// and waits until it has both ends and both links exist.
pub(crate) fn pty_pair(dir: &Path) -> PtyPair {
    let a = dir.join("a");
    let b = dir.join("b");
    let mut command = Command::new("socat");
    command.arg("-d").arg("-d");
    for link in [&a, &b] {
        command.arg(format!("pty,raw,echo=0,link={}", link.display()));
    }
    let mut socat = Process::spawn("socat", command);
    // socat creates both ptys and their links, then logs this notice.
    socat.wait_for_line(Pipe::Stderr, READY_TIMEOUT, |l| {
        l.contains("starting data transfer loop")
    });
    for link in [&a, &b] {
        assert!(
            link.exists(),
            "socat started its transfer loop but {} does not exist; stderr:\n{}",
            link.display(),
            socat.stderr()
        );
    }
    PtyPair {
        a,
        b,
        _socat: socat,
    }
}

/// What a finished command printed.
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// Panics with both outputs unless the command exited 0.
    pub(crate) fn expect_success(self, what: &str) -> Finished {
        assert!(
            self.status.success(),
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `command` to completion, killing it and panicking if it takes
/// longer than [`RUN_TIMEOUT`].
pub(crate) fn run(name: &str, command: Command) -> Finished {
    let shown = format!("{command:?}");
    let mut process = Process::spawn(name, command);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = process.child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            process.fail(&format!("did not finish within {RUN_TIMEOUT:?}: {shown}"));
        }
        thread::sleep(POLL_EVERY);
    };
    // The process has exited: its pipes close once any grandchildren holding
    // them do too, which these commands do not have.
    let mut stdout = String::new();
    while let Ok((pipe, line)) = process.lines.recv_timeout(RUN_TIMEOUT) {
        if pipe == Pipe::Stdout {
            stdout.push_str(&line);
            stdout.push('\n');
        }
    }
    Finished {
        status,
        stdout,
        stderr: process.stderr(),
    }
}

/// `tests/interop/<name>`.
pub(crate) fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
        .join(name)
}

/// What one raw register value of `field` is worth in engineering units
/// (`value = raw * multiplier + offset`), for meters behind `ratios`.
pub(crate) fn multiplier(field: &Field, ratios: Ratios) -> f64 {
    field.scale
        * match field.ratios {
            RatioUse::None => 1.0,
            RatioUse::Ct => ratios.ct,
            RatioUse::Pt => ratios.pt,
            RatioUse::CtPt => ratios.ct * ratios.pt,
        }
}

/// One HTTP/1.0 request to `address` (so the answer is neither chunked nor
/// kept alive), bounded by [`RUN_TIMEOUT`]: (status, body). For talking to
/// servers the tests start (VictoriaMetrics, the ingest's API) without an
/// HTTP client crate.
pub(crate) fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut stream = TcpStream::connect_timeout(&address, RUN_TIMEOUT)?;
    stream.set_read_timeout(Some(RUN_TIMEOUT))?;
    stream.set_write_timeout(Some(RUN_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    Ok((status, body.to_string()))
}
