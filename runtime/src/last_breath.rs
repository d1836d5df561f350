//! Last words for a run a stage brings down, and the per-call time limit.
//!
//! A stage is foreign code inside hone's process (see docs/architecture.md,
//! "Containing stages"): a plugin that calls `abort()` or `exit()`, or
//! faults, ends hone with it, and one that never returns stalls the run. We
//! cannot survive that, but we can say who did it. Before every call into a
//! stage, its worker records (stage, round, call) in its slot here; a signal
//! handler, an `atexit` handler and a watchdog thread read the slots.
//!
//! - A fatal signal (SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE) during a call
//!   prints the stage and round, then lets the signal take its usual course
//!   (the previous handler: Rust's stack-overflow report, or the default
//!   action), so the exit status still says which signal it was.
//! - `exit()` from inside a call prints the stage and round and ends hone
//!   with status 1 ("a stage failed"): a plugin's `exit(0)` must not make a
//!   half-done run look like a success.
//! - With `--stage-timeout SECS`, a call running longer than that prints the
//!   stage and round and ends hone with status 1. Without it, a call that has
//!   reported nothing (no progress, no log line) for ten minutes gets one
//!   notice saying so.
//!
//! The run directory stays consistent in every case: its files are written
//! atomically, and the journal lists only rounds that completed, so
//! `--resume` runs the rest.
//!
//! The signal handler allocates nothing and takes no lock: it reads atomics
//! and strings fixed before the run started, and formats into a stack buffer.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The most worker threads one process may run: each has a slot here.
pub const MAX_WORKERS: usize = 1024;

/// Which call into a stage is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `create`: the stage reads its config and loads what it needs.
    Create = 1,
    /// `on_batch`: a batch of records.
    Batch = 2,
    /// `on_round_end`: the round's input is complete.
    RoundEnd = 3,
}

impl Call {
    fn name(code: usize) -> &'static str {
        match code {
            1 => "create",
            2 => "on_batch",
            _ => "on_round_end",
        }
    }
}

/// One worker's call in flight. `stage` is the stage index plus one, 0 when
/// the worker is outside any stage; it is written last and cleared first.
struct Slot {
    stage: AtomicUsize,
    worker: AtomicUsize,
    round: AtomicU64,
    call: AtomicUsize,
    since_ms: AtomicU64,
    heard_ms: AtomicU64,
    noticed: AtomicBool,
}

impl Slot {
    // Only ever copied into the static array below, never used by reference.
    #[allow(clippy::declare_interior_mutable_const)]
    const IDLE: Slot = Slot {
        stage: AtomicUsize::new(0),
        worker: AtomicUsize::new(0),
        round: AtomicU64::new(0),
        call: AtomicUsize::new(0),
        since_ms: AtomicU64::new(0),
        heard_ms: AtomicU64::new(0),
        noticed: AtomicBool::new(false),
    };
}

static SLOTS: [Slot; MAX_WORKERS] = [const { Slot::IDLE }; MAX_WORKERS];

/// What the messages name, fixed before the run starts.
struct RunInfo {
    /// `stage `ID` (KIND)` per stage index.
    stages: Vec<String>,
    /// The closing lines: where the run directory is and how to go on.
    footer: String,
    started: Instant,
}

static RUN: OnceLock<RunInfo> = OnceLock::new();
/// Set by hone itself before it exits, so the `atexit` handler stays quiet.
static DELIBERATE_EXIT: AtomicBool = AtomicBool::new(false);
/// Only the first of several dying threads speaks.
static SPOKEN: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's slot, when it is a worker.
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn now_ms() -> u64 {
    RUN.get()
        .map(|r| r.started.elapsed().as_millis() as u64)
        .unwrap_or(0)
}

/// A call in flight; the slot is cleared when it is dropped.
pub struct InCall {
    slot: usize,
}

/// Records that `worker` is entering `call` of stage `stage` in `round`.
pub fn enter(worker: usize, stage: usize, round: u64, call: Call) -> InCall {
    let slot = worker % MAX_WORKERS;
    let s = &SLOTS[slot];
    let now = now_ms();
    s.worker.store(worker, Ordering::Relaxed);
    s.round.store(round, Ordering::Relaxed);
    s.call.store(call as usize, Ordering::Relaxed);
    s.since_ms.store(now, Ordering::Relaxed);
    s.heard_ms.store(now, Ordering::Relaxed);
    s.noticed.store(false, Ordering::Relaxed);
    s.stage.store(stage + 1, Ordering::Release);
    MY_SLOT.with(|m| m.set(slot));
    InCall { slot }
}

impl Drop for InCall {
    fn drop(&mut self) {
        SLOTS[self.slot].stage.store(0, Ordering::Release);
    }
}

/// The stage on `worker` reported something (progress, a log line): it is
/// not silent.
pub fn heard(worker: usize) {
    SLOTS[worker % MAX_WORKERS]
        .heard_ms
        .store(now_ms(), Ordering::Relaxed);
}

/// Tells the handlers that hone is exiting on purpose.
pub fn exiting() {
    DELIBERATE_EXIT.store(true, Ordering::SeqCst);
}

/// Installs the handlers for a run of `stages` (`(id, kind)` by index) into
/// `run_dir`; with `timeout`, starts the watchdog that enforces it.
pub fn install(stages: &[(String, String)], run_dir: &std::path::Path, timeout: Option<Duration>) {
    let info = RunInfo {
        stages: stages
            .iter()
            .map(|(id, kind)| format!("stage `{id}` ({kind})"))
            .collect(),
        footer: format!(
            "run directory: {} (its files are whole; journal.jsonl lists the rounds that \
             completed, and `hone run PIPELINE --resume` continues after the last of them, or \
             runs the pipeline again if none completed, keeping this attempt in attempts/)\n",
            run_dir.display()
        ),
        started: Instant::now(),
    };
    if RUN.set(info).is_err() {
        return; // installed already (one run per process)
    }
    // SAFETY: installing handlers with sigaction; `previous` outlives them
    // (a static), and `at_exit` is an `extern "C" fn()` as atexit wants.
    unsafe {
        for (i, &sig) in FATAL.iter().enumerate() {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fatal_signal
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            action.sa_flags = libc::SA_ONSTACK | libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, PREVIOUS[i].as_ptr());
        }
        libc::atexit(at_exit);
    }
    let watchdog = std::thread::Builder::new().name("hone-watchdog".into());
    let _ = watchdog.spawn(move || watch(timeout));
}

const FATAL: [libc::c_int; 5] = [
    libc::SIGABRT,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
];

/// The handlers in place before ours (Rust's stack-overflow handler for
/// SIGSEGV and SIGBUS), restored before the signal is let through.
struct Previous(std::cell::UnsafeCell<libc::sigaction>);
// SAFETY: written once in `install` before any handler can run, read only
// by the handler afterwards.
unsafe impl Sync for Previous {}
impl Previous {
    fn as_ptr(&self) -> *mut libc::sigaction {
        self.0.get()
    }
}
#[allow(clippy::declare_interior_mutable_const)]
const NO_ACTION: Previous = Previous(std::cell::UnsafeCell::new(
    // SAFETY: sigaction is plain data; all-zero is SIG_DFL with no flags.
    unsafe { std::mem::zeroed() },
));
static PREVIOUS: [Previous; 5] = [NO_ACTION; 5];

/// Where the signal handler formats its message: static, because the
/// handler may run on the small alternate signal stack. Only the thread that
/// wins `SPOKEN` writes it.
struct Speech(std::cell::UnsafeCell<[u8; 4096]>);
// SAFETY: written only by the one thread that set `SPOKEN`.
unsafe impl Sync for Speech {}
static SPEECH: Speech = Speech(std::cell::UnsafeCell::new([0; 4096]));

/// A message formatted into borrowed bytes, without allocating.
struct Buf<'a> {
    bytes: &'a mut [u8],
    len: usize,
}

impl<'a> Buf<'a> {
    fn over(bytes: &'a mut [u8]) -> Self {
        Buf { bytes, len: 0 }
    }
    fn push(&mut self, s: &str) -> &mut Self {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        self
    }
    fn num(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        // The digits are ASCII.
        self.push(std::str::from_utf8(&digits[i..]).unwrap_or("?"))
    }
    fn write_stderr(&self) {
        // SAFETY: write(2) on fd 2 of bytes we own; async-signal-safe.
        unsafe {
            libc::write(2, self.bytes.as_ptr().cast(), self.len);
        }
    }
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// `stage `ID` (KIND) on worker W, in round R (CALL)` for a busy slot.
fn describe(buf: &mut Buf, run: &RunInfo, slot: usize) -> bool {
    let s = &SLOTS[slot];
    let stage = s.stage.load(Ordering::Acquire);
    let Some(name) = stage.checked_sub(1).and_then(|i| run.stages.get(i)) else {
        return false;
    };
    buf.push(name)
        .push(" on worker ")
        .num(s.worker.load(Ordering::Relaxed) as u64)
        .push(", in round ")
        .num(s.round.load(Ordering::Relaxed))
        .push(" (")
        .push(Call::name(s.call.load(Ordering::Relaxed)))
        .push(")");
    true
}

/// Writes "error: WHO WHAT" naming this thread's stage call, or, from a
/// thread outside any stage, every stage call in flight. Returns false (and
/// writes nothing) when no stage was running: then the fault is hone's own.
fn speak(what: &str) -> bool {
    let Some(run) = RUN.get() else { return false };
    if SPOKEN.swap(true, Ordering::SeqCst) {
        return true;
    }
    // SAFETY: this thread set `SPOKEN`, so it alone uses `SPEECH`.
    let mut buf = Buf::over(unsafe { &mut *SPEECH.0.get() });
    buf.push("\nerror: ");
    let mine = MY_SLOT.with(|m| m.get());
    let named = if mine < MAX_WORKERS {
        // A worker thread outside any stage call: the fault is hone's own,
        // whatever other workers are doing; blaming one would mislead.
        SLOTS[mine].stage.load(Ordering::Acquire) != 0 && describe(&mut buf, run, mine)
    } else {
        let mut any = false;
        for (slot, s) in SLOTS.iter().enumerate() {
            if s.stage.load(Ordering::Acquire) != 0 {
                if any {
                    buf.push("; ");
                } else {
                    buf.push("while running ");
                }
                any |= describe(&mut buf, run, slot);
            }
        }
        any
    };
    if !named {
        SPOKEN.store(false, Ordering::SeqCst);
        return false;
    }
    buf.push(" ").push(what).push("\n").push(&run.footer);
    buf.write_stderr();
    true
}

extern "C" fn on_fatal_signal(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let what = match sig {
        libc::SIGABRT => "aborted the process (SIGABRT: the stage called abort(), overflowed its stack, or failed while unwinding)",
        libc::SIGSEGV => "crashed the process (SIGSEGV: invalid memory access)",
        libc::SIGBUS => "crashed the process (SIGBUS: invalid memory access)",
        libc::SIGILL => "crashed the process (SIGILL: illegal instruction)",
        _ => "crashed the process (SIGFPE: arithmetic fault)",
    };
    speak(what);
    let i = FATAL.iter().position(|&s| s == sig).unwrap_or(0);
    // SAFETY: `info` is the kernel's siginfo for this delivery (SA_SIGINFO),
    // or null. si_code <= 0 means the signal was sent (kill, raise, abort)
    // rather than raised by a faulting instruction.
    let sent = info.is_null() || unsafe { (*info).si_code } <= 0;
    // SAFETY: restoring the handler in place before ours; then re-raising a
    // sent signal (it is delivered when this handler returns). A faulting
    // instruction re-runs on return and meets the restored handler itself
    // (for SIGSEGV / SIGBUS, Rust's stack-overflow report).
    // A sent signal goes to the default action: Rust's handler would return
    // from a sent SIGSEGV and let the process run on.
    unsafe {
        if sent {
            libc::signal(sig, libc::SIG_DFL);
        } else {
            libc::sigaction(sig, PREVIOUS[i].as_ptr(), std::ptr::null_mut());
        }
        if sent || (sig != libc::SIGSEGV && sig != libc::SIGBUS) {
            libc::raise(sig);
        }
    }
}

extern "C" fn at_exit() {
    if DELIBERATE_EXIT.load(Ordering::SeqCst) {
        return;
    }
    if speak("ended the process by calling exit(); hone stops with exit status 1") {
        // SAFETY: ending the process at once; atexit handlers must not call exit().
        unsafe { libc::_exit(1) }
    }
}

/// The watchdog: stops a call over `timeout`, and gives one notice for a
/// call silent for ten minutes.
fn watch(timeout: Option<Duration>) {
    const SILENT: Duration = Duration::from_secs(600);
    let Some(run) = RUN.get() else { return };
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = now_ms();
        for (slot, s) in SLOTS.iter().enumerate() {
            if s.stage.load(Ordering::Acquire) == 0 {
                continue;
            }
            let ran = Duration::from_millis(now.saturating_sub(s.since_ms.load(Ordering::Relaxed)));
            if let Some(limit) = timeout.filter(|l| ran > *l) {
                let mut storage = [0u8; 1024];
                let mut who = Buf::over(&mut storage);
                let since = s.since_ms.load(Ordering::Relaxed);
                // The call may have ended, and another begun, since `ran`
                // was read: stop only the call that overran.
                let still = Duration::from_millis(now_ms().saturating_sub(since)) > limit;
                if !describe(&mut who, run, slot) || !still || SPOKEN.swap(true, Ordering::SeqCst) {
                    continue;
                }
                eprintln!(
                    "\nerror: {} has run for {:.0} s, over the limit set by --stage-timeout ({} s); \
                     hone stops with exit status 1 (raise the limit if the stage is only slow)\n{}",
                    who.as_str(),
                    ran.as_secs_f64(),
                    limit.as_secs(),
                    run.footer.trim_end()
                );
                // SAFETY: the stalled call cannot be interrupted; ending the
                // process is the only way to stop it. _exit skips atexit.
                unsafe { libc::_exit(1) }
            }
            let quiet_for =
                Duration::from_millis(now.saturating_sub(s.heard_ms.load(Ordering::Relaxed)));
            if quiet_for > SILENT && !s.noticed.swap(true, Ordering::Relaxed) {
                let mut storage = [0u8; 1024];
                let mut who = Buf::over(&mut storage);
                if describe(&mut who, run, slot) {
                    eprintln!(
                        "note: {} has reported nothing for {} minutes; if it is stuck, stop \
                         hone (Ctrl-C) and run again with --resume and --stage-timeout SECS",
                        who.as_str(),
                        quiet_for.as_secs() / 60
                    );
                }
            }
        }
    }
}
