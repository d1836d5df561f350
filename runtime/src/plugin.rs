//! Loading stage plugins: discovery, the version handshake, and safe
//! wrappers around the C ABI of `hone_sdk::abi`.

use hone_sdk::abi::{self, Bytes, HostCallbacks, OwnedBytes, PluginTable};
use hone_sdk::{Event, Record, StageDescriptor, StageError, StageInit};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};

/// A stage kind and the library that provides it.
#[derive(Clone)]
pub struct StageKind {
    /// What the stage says about itself.
    pub descriptor: StageDescriptor,
    /// The library it came from.
    pub library: PathBuf,
    table: &'static PluginTable,
}

/// Every stage kind found on the plugin path.
#[derive(Default, Clone)]
pub struct Registry {
    /// Kinds by name.
    pub kinds: BTreeMap<String, StageKind>,
    /// Libraries that were refused, with the reason.
    pub refused: Vec<String>,
}

impl Registry {
    /// Loads every plugin library in `dirs`, in order; the first library to
    /// offer a kind wins.
    pub fn load(dirs: &[PathBuf]) -> Registry {
        let mut reg = Registry::default();
        let mut seen = Vec::new();
        for dir in dirs {
            let Ok(read) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = read
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_library(p))
                .collect();
            files.sort();
            for file in files {
                let canonical = file.canonicalize().unwrap_or(file.clone());
                if seen.contains(&canonical) {
                    continue;
                }
                seen.push(canonical);
                match load_library(&file) {
                    Ok(None) => {}
                    Ok(Some((table, descriptors))) => {
                        for descriptor in descriptors {
                            reg.kinds
                                .entry(descriptor.kind.clone())
                                .or_insert(StageKind {
                                    descriptor,
                                    library: file.clone(),
                                    table,
                                });
                        }
                    }
                    Err(e) => reg.refused.push(e),
                }
            }
        }
        reg
    }

    /// Descriptors by kind, for validation.
    pub fn descriptors(&self) -> BTreeMap<String, StageDescriptor> {
        self.kinds
            .iter()
            .map(|(k, v)| (k.clone(), v.descriptor.clone()))
            .collect()
    }
}

fn is_library(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(ext, "so" | "dylib" | "dll") && p.is_file()
}

/// The plugin search path: `--plugin-path` dirs, the pipeline's own
/// `plugin_path`, `$HONE_PLUGIN_PATH`, then the directory of the `hone`
/// executable (where cargo puts the built-in plugins).
pub fn search_path(cli: &[PathBuf], pipeline: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = cli.to_vec();
    dirs.extend_from_slice(pipeline);
    if let Some(env) = std::env::var_os("HONE_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&env));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(dir.clone());
        // `cargo test` binaries live in target/<profile>/deps.
        if dir.ends_with("deps") {
            if let Some(parent) = dir.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    dirs
}

/// Checks the `--plugin-path` directories: each must be an existing
/// directory (a typo would otherwise be skipped in silence, and the stage
/// kinds it holds reported as unknown). The error names the directory.
pub fn check_cli_dirs(dirs: &[PathBuf]) -> Result<(), String> {
    for dir in dirs {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "--plugin-path {}: not a directory; give the directory that holds the plugin \
                     libraries (e.g. `--plugin-path {}`)",
                    dir.display(),
                    dir.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                        .display()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "--plugin-path {}: cannot read the directory: {e}; give a directory that \
                     holds plugin libraries (build one with `cargo build --release`, then pass \
                     its target/release)",
                    dir.display()
                ))
            }
        }
    }
    Ok(())
}

/// Checks a plugin's ABI version and SDK semver against ours.
pub fn check_versions(path: &Path, abi_version: u32, sdk_version: &str) -> Result<(), String> {
    if abi_version != abi::ABI_VERSION {
        return Err(format!(
            "{}: plugin ABI version {abi_version} (hone-sdk {sdk_version}) does not match this hone's \
             ABI version {} (hone-sdk {}): rebuild the plugin against hone-sdk {}",
            path.display(),
            abi::ABI_VERSION,
            hone_sdk::SDK_VERSION,
            hone_sdk::SDK_VERSION
        ));
    }
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    let ours = parse(hone_sdk::SDK_VERSION);
    let theirs = parse(sdk_version);
    let compatible = match (ours, theirs) {
        (Some((0, a)), Some((0, b))) => a == b,
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
    };
    if !compatible {
        return Err(format!(
            "{}: plugin built with hone-sdk {sdk_version} is not compatible with this hone's \
             hone-sdk {} (semver caret rules): rebuild the plugin against hone-sdk {}",
            path.display(),
            hone_sdk::SDK_VERSION,
            hone_sdk::SDK_VERSION
        ));
    }
    Ok(())
}

type Loaded = (&'static PluginTable, Vec<StageDescriptor>);

/// Loads one library. `Ok(None)`: not a hone plugin (no entry symbol).
fn load_library(path: &Path) -> Result<Option<Loaded>, String> {
    // SAFETY: loading runs the library's initialisers; we only load files from
    // the plugin path the user configured.
    let lib = match unsafe { libloading::Library::new(path) } {
        Ok(lib) => lib,
        Err(e) => return Err(format!("{}: cannot load library: {e}", path.display())),
    };
    // SAFETY: the symbol, if present, has the SDK's entry signature.
    let entry = unsafe {
        lib.get::<unsafe extern "C" fn() -> *const PluginTable>(abi::ENTRY_SYMBOL.as_bytes())
    };
    let Ok(entry) = entry else { return Ok(None) };
    // SAFETY: calling the entry is the documented protocol.
    let table = unsafe { entry() };
    // Libraries are never unloaded: thread-local destructors and statics in
    // them may outlive any handle we could drop.
    std::mem::forget(lib);
    if table.is_null() {
        return Err(format!(
            "{}: plugin entry returned no table",
            path.display()
        ));
    }
    // The ABI version is the first field of every table version: read it
    // before trusting the rest of the layout.
    // SAFETY: `table` points to a static table whose first field is a u32.
    let abi_version = unsafe { *(table as *const u32) };
    if abi_version != abi::ABI_VERSION {
        return Err(check_versions(path, abi_version, "unknown").unwrap_err());
    }
    // SAFETY: same ABI version, so the layout is ours; the table is static.
    let table: &'static PluginTable = unsafe { &*table };
    // SAFETY: the version string is static in the plugin.
    let sdk_version = String::from_utf8_lossy(unsafe { table.sdk_version.as_slice() }).into_owned();
    check_versions(path, abi_version, &sdk_version)?;
    let ours = hone_sdk::records::RECORD_FINGERPRINT;
    // SAFETY: the fingerprint string is static in the plugin.
    let theirs = String::from_utf8_lossy(unsafe { table.record_schema.as_slice() }).into_owned();
    if theirs != ours {
        return Err(format!(
            "{}: plugin's record layouts (fingerprint {theirs}, hone-sdk {sdk_version}) differ from              this hone's (fingerprint {ours}, hone-sdk {}): rebuild the plugin against this hone-sdk",
            path.display(),
            hone_sdk::SDK_VERSION
        ));
    }
    // SAFETY: `describe` follows the ABI contract.
    let bytes = take(table, unsafe { (table.describe)() });
    let descriptors: Vec<StageDescriptor> = serde_json::from_slice(&bytes).map_err(|_| {
        let e = abi::parse_error(&bytes);
        format!(
            "{}: describing its stages failed: {}",
            path.display(),
            e.message
        )
    })?;
    Ok(Some((table, descriptors)))
}

/// Copies a plugin-owned buffer and gives it back to the plugin to free.
fn take(table: &PluginTable, buf: OwnedBytes) -> Vec<u8> {
    // SAFETY: `buf` came from this table and is freed exactly once, here.
    unsafe {
        let v = buf.to_vec();
        (table.free)(buf);
        v
    }
}

/// Handles an event the moment the plugin raises it; returns it to keep it.
type LiveEvents = Box<dyn FnMut(Event) -> Option<Event>>;

/// What a stage produced during one call.
#[derive(Default)]
pub struct Emitted {
    /// Record batches per output port, in emission order.
    pub records: Vec<(u32, Vec<Record>)>,
    /// Events in order (those `live` did not take), each with the time it
    /// was raised (seconds since the Unix epoch): a metric's time is when the
    /// stage produced it, not when worker 0 came to write it down.
    pub events: Vec<(f64, Event)>,
    /// A batch or event that could not be decoded.
    pub corrupt: Option<String>,
    /// Sees every event as it is raised, during the call: progress of a
    /// long call must show while it runs, not when it returns.
    live: Option<LiveEvents>,
}

impl Emitted {
    /// Collects records and events, handing each event to `live` first.
    pub fn with_live_events(live: impl FnMut(Event) -> Option<Event> + 'static) -> Self {
        Emitted {
            live: Some(Box::new(live)),
            ..Default::default()
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

unsafe extern "C" fn host_emit(host: *mut c_void, port: u32, batch: Bytes) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `host` is the `Emitted` passed with this call; `batch` is valid for it.
        let (out, bytes) = unsafe { (&mut *(host as *mut Emitted), batch.as_slice()) };
        match abi::decode_batch(bytes) {
            Ok(records) => out.records.push((port, records)),
            Err(e) => out.corrupt = Some(e),
        }
    }));
}

unsafe extern "C" fn host_event(host: *mut c_void, event: Bytes) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: as in `host_emit`.
        let (out, bytes) = unsafe { (&mut *(host as *mut Emitted), event.as_slice()) };
        match serde_json::from_slice(bytes) {
            Ok(e) => {
                let kept = match out.live.as_mut() {
                    Some(live) => live(e),
                    None => Some(e),
                };
                out.events.extend(kept.map(|e| (unix_now(), e)));
            }
            Err(e) => out.corrupt = Some(format!("corrupt event: {e}")),
        }
    }));
}

/// A live stage instance inside a plugin.
pub struct StageInstance {
    table: &'static PluginTable,
    instance: *mut c_void,
    /// The stage id, for messages.
    pub stage_id: String,
}

impl StageInstance {
    /// Creates an instance of `kind`.
    pub fn create(kind: &StageKind, init: &StageInit) -> Result<Self, StageError> {
        let json = serde_json::to_vec(init).expect("init always encodes");
        let mut instance: *mut c_void = std::ptr::null_mut();
        // SAFETY: ABI contract: valid bytes and out-pointer for the call.
        let err = unsafe { (kind.table.create)(Bytes::from_slice(&json), &mut instance) };
        let err = take_error(kind.table, err);
        if let Some(e) = err {
            return Err(e);
        }
        Ok(StageInstance {
            table: kind.table,
            instance,
            stage_id: init.stage_id.clone(),
        })
    }

    /// Feeds a batch to input `port` in `round`.
    pub fn on_batch(
        &mut self,
        port: u32,
        round: u64,
        records: &[Record],
        out: &mut Emitted,
    ) -> Result<(), StageError> {
        let bytes = abi::encode_batch(records);
        let cb = callbacks(out);
        // SAFETY: ABI contract; `out` outlives the call.
        let err = unsafe {
            (self.table.on_batch)(self.instance, &cb, port, round, Bytes::from_slice(&bytes))
        };
        self.finish(err, out)
    }

    /// Tells the instance that `round` is complete.
    pub fn on_round_end(&mut self, round: u64, out: &mut Emitted) -> Result<(), StageError> {
        let cb = callbacks(out);
        // SAFETY: ABI contract; `out` outlives the call.
        let err = unsafe { (self.table.on_round_end)(self.instance, &cb, round) };
        self.finish(err, out)
    }

    /// Whether the plugin's table has the snapshot entries (a plugin built
    /// before them cannot say whether it keeps state).
    pub fn can_snapshot(&self) -> bool {
        self.table
            .has(entry_end(std::mem::offset_of!(PluginTable, snapshot)))
    }

    /// The instance's state at the end of `round` (`None`: it keeps none,
    /// or its plugin's table predates snapshots).
    pub fn snapshot(&mut self, round: u64) -> Result<Option<Vec<u8>>, StageError> {
        if !self
            .table
            .has(entry_end(std::mem::offset_of!(PluginTable, snapshot)))
        {
            return Ok(None);
        }
        let mut out = OwnedBytes {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        };
        // SAFETY: ABI contract; `out` is a valid out-pointer for the call.
        let err = unsafe { (self.table.snapshot)(self.instance, round, &mut out) };
        if let Some(e) = take_error(self.table, err) {
            return Err(e);
        }
        Ok((!out.is_empty()).then(|| take(self.table, out)))
    }

    /// Restores the instance from a snapshot taken at the end of `round`.
    pub fn restore(&mut self, round: u64, state: &[u8]) -> Result<(), StageError> {
        if !self
            .table
            .has(entry_end(std::mem::offset_of!(PluginTable, restore)))
        {
            return Err(StageError::new(format!(
                "stage '{}' was built before snapshots existed: it cannot be restored",
                self.stage_id
            )));
        }
        // SAFETY: ABI contract; `state` outlives the call.
        let err = unsafe { (self.table.restore)(self.instance, round, Bytes::from_slice(state)) };
        take_error(self.table, err).map_or(Ok(()), Err)
    }

    fn finish(&self, err: OwnedBytes, out: &mut Emitted) -> Result<(), StageError> {
        if let Some(e) = take_error(self.table, err) {
            return Err(e);
        }
        match out.corrupt.take() {
            Some(c) => Err(StageError::new(c)),
            None => Ok(()),
        }
    }
}

/// Where a table entry starting at `offset` ends.
fn entry_end(offset: usize) -> usize {
    offset + std::mem::size_of::<unsafe extern "C" fn()>()
}

fn callbacks(out: &mut Emitted) -> HostCallbacks {
    HostCallbacks {
        host: out as *mut Emitted as *mut c_void,
        emit: host_emit,
        event: host_event,
    }
}

fn take_error(table: &PluginTable, buf: OwnedBytes) -> Option<StageError> {
    if buf.is_empty() {
        return None;
    }
    Some(abi::parse_error(&take(table, buf)))
}

impl Drop for StageInstance {
    fn drop(&mut self) {
        // SAFETY: created by this table, destroyed once.
        unsafe { (self.table.destroy)(self.instance) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_handshake_refuses_with_both_versions() {
        let p = Path::new("libx.so");
        assert!(check_versions(p, abi::ABI_VERSION, hone_sdk::SDK_VERSION).is_ok());
        let e = check_versions(p, abi::ABI_VERSION + 1, "9.9.9").unwrap_err();
        assert!(
            e.contains(&format!("ABI version {}", abi::ABI_VERSION + 1))
                && e.contains(&format!("ABI version {}", abi::ABI_VERSION)),
            "{e}"
        );
        let e = check_versions(p, abi::ABI_VERSION, "7.0.0").unwrap_err();
        assert!(
            e.contains("hone-sdk 7.0.0") && e.contains(hone_sdk::SDK_VERSION),
            "{e}"
        );
    }
}
