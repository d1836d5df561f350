//! `hone serve`: a pipeline's rounds run on, while an HTTP server takes
//! people's labels for its `human.label` stages.
//!
//! The server runs on a tokio runtime of its own threads; the timely
//! workers never wait on it. The two meet in the run directory (see
//! [`hone_sdk::feedback`]) and in [`crate::telemetry::Telemetry`].

pub mod http;
pub mod load;
pub mod store;

use crate::telemetry::Telemetry;
use hone_sdk::feedback::{self, Serving};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The environment variable that gives the bearer token instead of the file.
pub const TOKEN_ENV: &str = "HONE_SERVE_TOKEN";

/// The token file in the run directory (mode 0600).
pub const TOKEN_FILE: &str = "serve/token";

/// A started server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The bearer token.
    pub token: String,
    /// What the handlers share (the store, for the stop watcher).
    pub shared: Arc<http::Shared>,
}

/// The bearer token: `HONE_SERVE_TOKEN`, else `RUN_DIR/serve/token`, made at
/// first start from the system's random source and readable by its owner only.
fn token(run_dir: &Path) -> Result<String, String> {
    if let Ok(t) = std::env::var(TOKEN_ENV) {
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(format!(
                "{TOKEN_ENV} is shorter than 16 characters: give a longer token, or unset it to use a generated one"
            ));
        }
        return Ok(t);
    }
    let path = run_dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom for a token: {e}"))?;
    let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, t.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(t)
}

/// Writes `bytes` to `path` atomically, readable and writable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".token.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The lock a serving process holds on its run directory.
pub const LOCK_FILE: &str = "serve/lock";

static LOCK: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Takes (once per process) the exclusive lock on `RUN_DIR/serve/lock`,
/// held until the process ends: a second `hone serve` of the same run
/// directory would cut back the live run's logs.
pub fn lock(run_dir: &Path) -> Result<(), String> {
    if LOCK.get().is_some() {
        return Ok(());
    }
    let path = run_dir.join(LOCK_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function owns.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !taken {
        let pid = std::fs::read(run_dir.join(feedback::SERVING))
            .ok()
            .and_then(|b| serde_json::from_slice::<Serving>(&b).ok())
            .map(|s| format!(" (pid {}, {})", s.pid, s.addr))
            .unwrap_or_default();
        return Err(format!(
            "{} is being served by another hone serve{pid}: stop it first (SIGTERM), or use another --run-dir",
            run_dir.display()
        ));
    }
    let _ = LOCK.set(file);
    Ok(())
}

/// Whether a `hone serve` is serving `run_dir` now (its lock is held).
pub fn is_served(run_dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .open(run_dir.join(LOCK_FILE))
    else {
        return false;
    };
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function owns; released at once.
    unsafe {
        if libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 {
            libc::flock(file.as_raw_fd(), libc::LOCK_UN);
            false
        } else {
            true
        }
    }
}

/// Opens the label store, binds `addr` and serves on threads of its own.
pub fn start(run_dir: &Path, addr: &str, telemetry: Arc<Telemetry>) -> Result<Server, String> {
    lock(run_dir)?;
    let token = token(run_dir)?;
    let mut store = store::Store::open(run_dir)?;
    store.scan()?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        format!("cannot listen on {addr}: {e} (pick another with --addr HOST:PORT)")
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let serving = Serving {
        pid: std::process::id(),
        addr: addr.to_string(),
    };
    let path = run_dir.join(feedback::SERVING);
    hone_sdk::fs::atomic_write(
        &path,
        &serde_json::to_vec(&serving).expect("serving encodes"),
    )
    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let shared = Arc::new(http::Shared {
        store: Mutex::new(store),
        token: token.clone(),
        telemetry,
        run_dir: run_dir.to_path_buf(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hone-serve")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the HTTP server's threads: {e}"))?;
    let app = http::router(shared.clone());
    let scanning = shared.clone();
    std::thread::Builder::new()
        .name("hone-serve".into())
        .spawn(move || {
            runtime.block_on(async move {
                // New queues from the stages, and answers files to write.
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let s = scanning.clone();
                        let scanned = tokio::task::spawn_blocking(move || {
                            s.store.lock().unwrap_or_else(|e| e.into_inner()).scan()
                        })
                        .await;
                        if let Ok(Err(e)) = scanned {
                            eprintln!("error: {e}");
                        }
                    }
                });
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app).await {
                            eprintln!("error: the HTTP server stopped: {e}");
                        }
                    }
                    Err(e) => eprintln!("error: cannot serve: {e}"),
                }
            })
        })
        .map_err(|e| format!("cannot start the HTTP server's thread: {e}"))?;
    Ok(Server {
        addr,
        token,
        shared,
    })
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    // The second signal ends the process here and now: nothing the watcher
    // might wait on (a lock, a disk) can delay it. Every file is written
    // atomically, so what is on disk stays consistent.
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(143) }
    }
}

/// SIGTERM (and Ctrl-C): the first lets the round in flight finish (its
/// snapshots are written with it) and exits 0; when the round is waiting
/// for people's labels it exits 0 at once, resumable at the last completed
/// round with every label kept. A second signal exits at once (143).
/// Either way what is on disk is consistent: every file is written
/// atomically and the journal names only completed rounds.
pub fn exit_on_signals(server: &Server, quiet: bool) {
    // SAFETY: the handler only touches an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let shared = server.shared.clone();
    std::thread::spawn(move || {
        let mut stopping_at = None;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let signals = SIGNALS.load(Ordering::SeqCst);
            if signals == 0 {
                continue;
            }
            let t = &shared.telemetry;
            let completed = t.completed();
            let at = *stopping_at.get_or_insert_with(|| {
                t.request_stop(completed);
                if !quiet {
                    eprintln!(
                        "hone serve: stopping after round {completed} (a second signal exits at once)"
                    );
                }
                completed
            });
            // A busy store (a scan, a commit) is asked again next tick.
            let waiting = shared
                .store
                .try_lock()
                .is_ok_and(|s| !s.waiting_rounds().is_empty());
            if completed > at || waiting || t.figures().finished {
                if !quiet {
                    eprintln!(
                        "hone serve: stopped with {} round(s) complete; `hone serve` again resumes",
                        t.completed()
                    );
                }
                crate::last_breath::exiting();
                std::process::exit(0);
            }
        }
    });
}

/// The run directory's label database, for tests and audits.
pub fn database(run_dir: &Path) -> PathBuf {
    run_dir.join(store::DATABASE)
}
