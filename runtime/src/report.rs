//! Progress and log lines: bars on a terminal, plain lines otherwise. Stages
//! report from worker threads; one printer thread owns the terminal.

use crossbeam_channel::{unbounded, Receiver, Sender};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A line for the user.
#[derive(Debug, Clone)]
pub enum Report {
    /// Progress of a stage's step.
    Progress {
        /// Stage id.
        stage: String,
        /// What progresses.
        label: String,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// A log line.
    Log(String),
    /// A stage failure.
    Failed(String),
}

/// The sending side, cloned into every worker.
#[derive(Clone)]
pub struct Reporter {
    tx: Sender<Report>,
}

impl Reporter {
    /// Sends a report; never blocks.
    pub fn send(&self, r: Report) {
        let _ = self.tx.send(r);
    }
}

/// The printer thread.
pub struct Printer {
    handle: JoinHandle<()>,
}

impl Printer {
    /// Starts printing to stderr; `quiet` shows failures only.
    pub fn start(quiet: bool) -> (Reporter, Printer) {
        let (tx, rx) = unbounded();
        let handle = std::thread::spawn(move || print_loop(rx, quiet));
        (Reporter { tx }, Printer { handle })
    }

    /// Waits until every reporter is dropped and everything is printed.
    pub fn finish(self) {
        let _ = self.handle.join();
    }
}

fn print_loop(rx: Receiver<Report>, quiet: bool) {
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let mut bars: HashMap<(String, String), ProgressBar> = HashMap::new();
    let mut last_line: HashMap<(String, String), (Instant, u64)> = HashMap::new();
    for report in rx {
        match report {
            // The summary at the end of the run repeats it; on a terminal
            // show it at once above the bars.
            Report::Failed(msg) => {
                if tty {
                    let _ = multi.println(format!("error: {msg}"));
                }
            }
            _ if quiet => {}
            Report::Log(msg) => {
                if tty {
                    let _ = multi.println(msg);
                } else {
                    eprintln!("{msg}");
                }
            }
            Report::Progress {
                stage,
                label,
                done,
                total,
            } => {
                let key = (stage.clone(), label.clone());
                if tty {
                    let bar = bars.entry(key).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(total));
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{prefix:>12} {msg:<16} [{bar:30}] {pos}/{len} {eta}",
                            )
                            .expect("static template")
                            .progress_chars("=> "),
                        );
                        bar.set_prefix(stage);
                        bar.set_message(label);
                        bar
                    });
                    bar.set_length(total.max(done));
                    bar.set_position(done);
                    if total > 0 && done >= total {
                        bar.finish();
                    }
                } else {
                    // Plain lines: at most one every 2 s per step, plus the last.
                    let now = Instant::now();
                    let entry = last_line
                        .entry(key)
                        .or_insert((now - Duration::from_secs(10), u64::MAX));
                    let finished = total > 0 && done >= total;
                    if entry.1 != done
                        && (finished || now.duration_since(entry.0) >= Duration::from_secs(2))
                    {
                        *entry = (now, done);
                        if total > 0 {
                            eprintln!("[{stage}] {label}: {done}/{total}");
                        } else {
                            eprintln!("[{stage}] {label}: {done}");
                        }
                    }
                }
            }
        }
    }
    for bar in bars.values() {
        bar.finish();
    }
}
