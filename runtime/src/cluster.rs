//! Cluster runs: the processes' addresses, checked before timely sees them,
//! and a deadline for the processes to find each other.
//!
//! timely's own networking retries and waits forever, printing "awaiting
//! connections" every second; a process whose peers never come (a missing
//! hostfile, a typo in `--process`) would hang silently for an operator.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Port of process 0 when there is no hostfile (timely's convention:
/// process `i` listens on `localhost:2101 + i`).
const FIRST_PORT: u16 = 2101;

/// The address of every process: the hostfile's first `processes` entries
/// (one `HOST:PORT` a line; blank lines and `#` comments skipped), or
/// `localhost:2101 + i` without one.
pub fn addresses(hostfile: Option<&Path>, processes: usize) -> Result<Vec<String>, String> {
    let Some(path) = hostfile else {
        return Ok((0..processes)
            .map(|i| format!("localhost:{}", FIRST_PORT as usize + i))
            .collect());
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "--hostfile {}: cannot read it: {e}; give a file with one HOST:PORT line per process",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut tokens = line.split_whitespace();
        let address = tokens.next().unwrap_or_default();
        if tokens.next().is_some() {
            return Err(format!(
                "{}:{}: one process address a line, found \"{line}\": put each HOST:PORT on its own line",
                path.display(),
                i + 1
            ));
        }
        {
            check_address(address).map_err(|why| {
                format!(
                    "{}:{}: \"{address}\" is not a process address ({why}): write HOST:PORT, \
                     e.g. `10.0.0.2:2101`",
                    path.display(),
                    i + 1
                )
            })?;
        }
        out.push(line.to_string());
        if out.len() == processes {
            break;
        }
    }
    if out.len() < processes {
        return Err(format!(
            "{}: {} process address{} for --processes {processes}: add one HOST:PORT line per process",
            path.display(),
            out.len(),
            if out.len() == 1 { "" } else { "es" }
        ));
    }
    Ok(out)
}

fn check_address(address: &str) -> Result<(), &'static str> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("no `:PORT`");
    };
    if host.is_empty() {
        return Err("no host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port must be a number from 1 to 65535"),
    }
}

/// Ends the process with status 1 and a message if the dataflow has not
/// started (`started` still false) after `timeout`: the peers never came.
pub fn connection_deadline(
    started: Arc<AtomicBool>,
    timeout: Duration,
    process: usize,
    addresses: Vec<String>,
) {
    std::thread::spawn(move || {
        let step = Duration::from_millis(100);
        let mut waited = Duration::ZERO;
        while waited < timeout {
            if started.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(step);
            waited += step;
        }
        if started.load(Ordering::SeqCst) {
            return;
        }
        let list: Vec<String> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| format!("process {i} at {a}"))
            .collect();
        eprintln!(
            "error: process {process} of {}: the other processes did not connect within {} s \
             (--connect-timeout). Expected {}. Start every process with the same --processes and \
             --hostfile and its own --process index, or raise --connect-timeout",
            addresses.len(),
            timeout.as_secs(),
            list.join(", ")
        );
        crate::last_breath::exiting();
        // SAFETY: timely's connection loop cannot be interrupted, so the
        // process ends here. (Process 0 prepared the run directory before
        // connecting: see docs/architecture.md, known gaps.)
        unsafe { libc::_exit(1) }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_by_line() {
        let dir = std::env::temp_dir().join(format!("hone-hostfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "# cluster\nlocalhost:2101\n\nnot-an-address\n").unwrap();
        let e = addresses(Some(&file), 2).unwrap_err();
        assert!(e.contains("hosts:4: \"not-an-address\""), "{e}");
        std::fs::write(&file, "localhost:2101\nhost:99999\n").unwrap();
        let e = addresses(Some(&file), 2).unwrap_err();
        assert!(e.contains("hosts:2:") && e.contains("1 to 65535"), "{e}");
        std::fs::write(&file, "localhost:2101\n").unwrap();
        let e = addresses(Some(&file), 3).unwrap_err();
        assert!(e.contains("1 process address for --processes 3"), "{e}");
        std::fs::write(&file, "localhost:2101\n# two\nlocalhost:2102\nextra:1\n").unwrap();
        assert_eq!(
            addresses(Some(&file), 2).unwrap(),
            ["localhost:2101", "localhost:2102"]
        );
        let e = addresses(Some(&dir.join("absent")), 2).unwrap_err();
        assert!(e.contains("--hostfile") && e.contains("absent"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
