//! A binary of ours running as a child process, for tests that drive the tiers as an operator
//! does: its output read line by line as it comes, signals sent, stopped when the handle drops
//! (so a failing test leaves nothing running).

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// The workspace's binary `name`, as `cargo build --workspace --bins` leaves it beside the
/// directory of the running test's executable (`target/<profile>/deps/..`): the same build,
/// whatever the target directory and profile.
///
/// # Panics
///
/// When it is not built.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// A running child whose stdout and stderr lines arrive on one channel.
pub struct Spawned {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Spawned {
    /// Starts `command` with its stdout and stderr piped to this handle.
    ///
    /// # Panics
    ///
    /// When the program cannot be started.
    pub fn start(command: &mut Command) -> Spawned {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [out, err].into_iter().flatten() {
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Spawned {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until `found` picks something out of one, for at most `within`.
    ///
    /// # Panics
    ///
    /// When nothing is found in time, with everything the child printed so far.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = found(&line);
                    self.seen.push(line);
                    if let Some(hit) = hit {
                        return hit;
                    }
                }
                Err(_) => panic!(
                    "no {what} within {within:?}; the child printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The address in the first `listen=<address>` the child logs: what our binaries log
    /// once they are serving, so a config can ask for port 0.
    pub fn listen_addr(&mut self) -> SocketAddr {
        self.logged_addr("listen")
    }

    /// The address in the first `<key>=<address>` the child logs (`listen`, `metrics`),
    /// whether that line was already read or is still to come.
    pub fn logged_addr(&mut self, key: &str) -> SocketAddr {
        let prefix = format!("{key}=");
        let pick = |line: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(prefix.as_str()))
                .and_then(|at| at.parse().ok())
        };
        if let Some(addr) = self.seen.iter().find_map(|line| pick(line)) {
            return addr;
        }
        self.wait_for(&format!("{prefix} line"), Duration::from_secs(10), pick)
    }

    /// Sends `signal` (`TERM`, `INT`) with bash's own `kill`: a minimal Debian may not have
    /// `/bin/kill`.
    ///
    /// # Panics
    ///
    /// When it cannot be sent.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("bash")
            .args(["-c", &format!("kill -{signal} {}", self.child.id())])
            .status();
        assert!(
            sent.is_ok_and(|s| s.success()),
            "kill -{signal} {}",
            self.child.id()
        );
    }

    /// Waits at most `within` for the child to exit; its status, and every line it printed.
    ///
    /// # Panics
    ///
    /// When it is still running then.
    pub fn wait_exit(&mut self, within: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("a child can be waited for") {
                // The reader threads finish once the pipes close.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return (status, self.seen.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "still running {within:?} on; it printed:\n{}",
                self.seen.join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no goodbye (a crash, as far as its peers can tell), and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every line printed so far.
    pub fn printed(&mut self) -> String {
        self.seen.extend(self.lines.try_iter());
        self.seen.join("\n")
    }
}

impl Drop for Spawned {
    /// SIGTERM first, so a script such as `deploy/up.sh` stops what it started (SIGKILL would
    /// orphan its children); SIGKILL after 5 s.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("bash")
                .args(["-c", &format!("kill -TERM {}", self.child.id())])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
