//! The plugin boundary: a versioned C ABI over which records cross as
//! bincode batches.
//!
//! Rules (see docs/architecture.md):
//! - One entry symbol, [`ENTRY_SYMBOL`], returns a static [`PluginTable`].
//!   Its first field is the ABI version, so a host can read it from any
//!   version of the table and refuse a mismatch before touching the rest.
//! - Memory is freed on the side that allocated it: the host owns what it
//!   passes in, and buffers the plugin returns go back through
//!   [`PluginTable::free`]. Records and events the plugin emits go through
//!   host callbacks, which copy before returning.
//! - Every entry point catches panics and turns them into an error naming
//!   the stage id and the panic message: under `extern "C"` an escaping panic
//!   would abort the host.
//! - Libraries are never unloaded.
//!
//! Authors never touch this module: [`crate::export_stages!`] does.

use crate::context::{Context, Event, HostLink};
use crate::{Record, Stage, StageDescriptor, StageError, StageFactory, StageInit};
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Version of the C ABI below. Bump on any change to [`PluginTable`],
/// [`HostCallbacks`] or the encodings, the JSON descriptors included (a host
/// could not decode a descriptor using a config type it does not know).
///
/// 2: the `Unsigned { min, max }` config field type.
/// 3: `table_size`, `record_schema`, `snapshot` and `restore` in the table;
///    typed records (token ids, per-token values, gold rewards, structured
///    artifact references); artifact kinds in port types.
///
/// From 3 on, entries are only ever appended to the table, and `table_size`
/// says how many a plugin has: a newer host reads an older plugin's table up
/// to its size and treats later entries as absent, so adding an entry needs
/// no version bump.
pub const ABI_VERSION: u32 = 3;

/// The symbol every plugin library exports. It keeps its name across ABI
/// versions: a host finds the table of a plugin of any version through it and
/// refuses a mismatch by the table's first field, with both versions named,
/// instead of skipping the library as "not a plugin".
pub const ENTRY_SYMBOL: &str = "hone_plugin_entry_v1";

/// Borrowed bytes: valid only for the duration of the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Bytes {
    /// Start of the bytes.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl Bytes {
    /// Borrows a slice.
    pub fn from_slice(s: &[u8]) -> Self {
        Bytes {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Views the bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that outlive the returned slice.
    pub unsafe fn as_slice<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// Bytes allocated by the plugin and handed to the host, which must give them
/// back through [`PluginTable::free`]. Empty (`ptr` null) means "no error".
#[repr(C)]
pub struct OwnedBytes {
    /// Start of the allocation (null when empty).
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
    /// Capacity of the allocation.
    pub cap: usize,
}

impl OwnedBytes {
    fn empty() -> Self {
        OwnedBytes {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        }
    }

    fn from_vec(v: Vec<u8>) -> Self {
        let mut v = std::mem::ManuallyDrop::new(v);
        OwnedBytes {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// Whether this carries nothing.
    pub fn is_empty(&self) -> bool {
        self.ptr.is_null()
    }

    /// Copies the bytes out.
    ///
    /// # Safety
    /// Must come from a plugin's table and not be freed yet.
    pub unsafe fn to_vec(&self) -> Vec<u8> {
        if self.ptr.is_null() {
            Vec::new()
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len).to_vec() }
        }
    }
}

/// Callbacks the host passes into every stage call.
#[repr(C)]
pub struct HostCallbacks {
    /// Opaque host state passed back to the callbacks.
    pub host: *mut c_void,
    /// Receives a bincode batch of records for an output port; copies it.
    pub emit: unsafe extern "C" fn(host: *mut c_void, port: u32, batch: Bytes),
    /// Receives a JSON [`Event`]; copies it.
    pub event: unsafe extern "C" fn(host: *mut c_void, event: Bytes),
}

/// The table a plugin's entry symbol returns.
#[repr(C)]
pub struct PluginTable {
    /// [`ABI_VERSION`] of the plugin's SDK. Always the first field.
    pub abi_version: u32,
    /// `size_of::<PluginTable>()` in the plugin's SDK: entries that end past
    /// it are absent (see [`PluginTable::has`]).
    pub table_size: u32,
    /// The plugin's SDK semver (UTF-8).
    pub sdk_version: Bytes,
    /// [`crate::records::RECORD_FINGERPRINT`] of the plugin's SDK (UTF-8):
    /// the host refuses a plugin whose record layouts differ from its own.
    pub record_schema: Bytes,
    /// JSON array of [`StageDescriptor`]s.
    pub describe: unsafe extern "C" fn() -> OwnedBytes,
    /// Creates a stage from a JSON [`StageInit`]; writes the instance to
    /// `out`. Returns a JSON [`StageError`] on failure, empty on success.
    pub create: unsafe extern "C" fn(init: Bytes, out: *mut *mut c_void) -> OwnedBytes,
    /// Feeds a bincode batch to input `port` in `round`. Returns an error or empty.
    pub on_batch: unsafe extern "C" fn(
        instance: *mut c_void,
        host: *const HostCallbacks,
        port: u32,
        round: u64,
        batch: Bytes,
    ) -> OwnedBytes,
    /// Tells the instance `round` is complete. Returns an error or empty.
    pub on_round_end: unsafe extern "C" fn(
        instance: *mut c_void,
        host: *const HostCallbacks,
        round: u64,
    ) -> OwnedBytes,
    /// Drops an instance.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
    /// Frees a buffer the plugin returned.
    pub free: unsafe extern "C" fn(buf: OwnedBytes),
    /// Saves the instance's state at the end of `round` into `out` (empty:
    /// the stage keeps no state). Returns an error or empty.
    pub snapshot:
        unsafe extern "C" fn(instance: *mut c_void, round: u64, out: *mut OwnedBytes) -> OwnedBytes,
    /// Restores a fresh instance from what `snapshot` saved at the end of
    /// `round`. Returns an error or empty.
    pub restore:
        unsafe extern "C" fn(instance: *mut c_void, round: u64, state: Bytes) -> OwnedBytes,
}

impl PluginTable {
    /// Whether the plugin's table reaches the entry that ends at byte `end`
    /// (use `offset_of!(PluginTable, entry) + size_of::<fn()>()`).
    pub fn has(&self, end: usize) -> bool {
        self.table_size as usize >= end
    }
}

// SAFETY: the table is immutable static data and function pointers.
unsafe impl Sync for PluginTable {}

/// Encodes a batch of records for the boundary.
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    bincode::serde::encode_to_vec(records, bincode::config::standard())
        .expect("records always encode")
}

/// Decodes a batch of records from the boundary.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Record>, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| format!("corrupt record batch: {e}"))
}

/// One stage kind a plugin offers.
pub struct Factory {
    /// Its descriptor.
    pub descriptor: fn() -> StageDescriptor,
    /// Creates an instance.
    pub create: fn(&StageInit) -> Result<Box<dyn Stage>, StageError>,
}

impl Factory {
    /// The factory of stage type `S`.
    pub fn of<S: StageFactory>() -> Self {
        Factory {
            descriptor: S::descriptor,
            create: |init| S::create(init).map(|s| Box::new(s) as Box<dyn Stage>),
        }
    }
}

static FACTORIES: OnceLock<Vec<Factory>> = OnceLock::new();

static TABLE: PluginTable = PluginTable {
    abi_version: ABI_VERSION,
    table_size: std::mem::size_of::<PluginTable>() as u32,
    sdk_version: Bytes {
        ptr: crate::SDK_VERSION.as_ptr(),
        len: crate::SDK_VERSION.len(),
    },
    record_schema: Bytes {
        ptr: crate::records::RECORD_FINGERPRINT.as_ptr(),
        len: crate::records::RECORD_FINGERPRINT.len(),
    },
    describe: ffi_describe,
    create: ffi_create,
    on_batch: ffi_on_batch,
    on_round_end: ffi_on_round_end,
    destroy: ffi_destroy,
    free: ffi_free,
    snapshot: ffi_snapshot,
    restore: ffi_restore,
};

/// Called by [`crate::export_stages!`]: registers the plugin's stages and
/// returns its table.
pub fn plugin_table(factories: fn() -> Vec<Factory>) -> *const PluginTable {
    FACTORIES.get_or_init(|| {
        install_panic_hook();
        factories()
    });
    &TABLE
}

fn factories() -> &'static [Factory] {
    FACTORIES.get().map(Vec::as_slice).unwrap_or(&[])
}

struct Instance {
    stage: Box<dyn Stage>,
    init: StageInit,
}

thread_local! {
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Keeps panics quiet (the host reports them as stage errors) and remembers
/// where they happened.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let loc = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        PANIC_LOCATION.with(|p| *p.borrow_mut() = loc);
        if std::env::var_os("HONE_PLUGIN_PANIC_TRACE").is_some() {
            previous(info);
        }
    }));
}

fn panic_message(stage_id: &str, payload: Box<dyn std::any::Any + Send>) -> StageError {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    };
    let location = PANIC_LOCATION.with(|p| p.borrow_mut().take());
    let at = location.map(|l| format!(" (at {l})")).unwrap_or_default();
    StageError::new(format!("stage '{stage_id}' panicked: {msg}{at}"))
}

fn error_bytes(e: &StageError) -> OwnedBytes {
    let json = serde_json::json!({ "location": e.location, "message": e.message });
    OwnedBytes::from_vec(json.to_string().into_bytes())
}

/// Parses an error buffer returned by the plugin.
pub fn parse_error(bytes: &[u8]) -> StageError {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    StageError {
        location: v["location"].as_str().unwrap_or("").to_string(),
        message: v["message"]
            .as_str()
            .unwrap_or("unreadable error from plugin")
            .to_string(),
    }
}

/// Runs `f`, containing any panic as an error naming `stage_id`.
fn contain(stage_id: &str, f: impl FnOnce() -> Result<(), StageError>) -> OwnedBytes {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => OwnedBytes::empty(),
        Ok(Err(e)) => error_bytes(&e),
        Err(payload) => error_bytes(&panic_message(stage_id, payload)),
    }
}

struct FfiLink<'a> {
    host: &'a HostCallbacks,
}

impl HostLink for FfiLink<'_> {
    fn emit_batch(&mut self, port: usize, batch: Vec<Record>) {
        let bytes = encode_batch(&batch);
        // SAFETY: the host guarantees the callback and its state are valid for the call.
        unsafe { (self.host.emit)(self.host.host, port as u32, Bytes::from_slice(&bytes)) }
    }
    fn event(&mut self, event: Event) {
        let bytes = serde_json::to_vec(&event).expect("events always encode");
        // SAFETY: as above.
        unsafe { (self.host.event)(self.host.host, Bytes::from_slice(&bytes)) }
    }
}

unsafe extern "C" fn ffi_describe() -> OwnedBytes {
    let result = catch_unwind(|| {
        let all: Vec<StageDescriptor> = factories().iter().map(|f| (f.descriptor)()).collect();
        serde_json::to_vec(&all).expect("descriptors always encode")
    });
    match result {
        Ok(v) => OwnedBytes::from_vec(v),
        Err(payload) => error_bytes(&panic_message("<describe>", payload)),
    }
}

unsafe extern "C" fn ffi_create(init: Bytes, out: *mut *mut c_void) -> OwnedBytes {
    // SAFETY: the host passes valid bytes for the call's duration.
    let bytes = unsafe { init.as_slice() };
    let init: StageInit = match serde_json::from_slice(bytes) {
        Ok(i) => i,
        Err(e) => return error_bytes(&StageError::new(format!("corrupt stage init: {e}"))),
    };
    let stage_id = init.stage_id.clone();
    contain(&stage_id, || {
        let factory = factories()
            .iter()
            .find(|f| (f.descriptor)().kind == init.kind)
            .ok_or_else(|| {
                StageError::new(format!("this plugin has no stage kind '{}'", init.kind))
            })?;
        let stage = (factory.create)(&init)?;
        let instance = Box::new(Instance { stage, init });
        // SAFETY: the host passes a valid out-pointer.
        unsafe { *out = Box::into_raw(instance) as *mut c_void };
        Ok(())
    })
}

unsafe extern "C" fn ffi_on_batch(
    instance: *mut c_void,
    host: *const HostCallbacks,
    port: u32,
    round: u64,
    batch: Bytes,
) -> OwnedBytes {
    // SAFETY: `instance` came from `ffi_create` and is used by one thread at a time;
    // `host` and `batch` are valid for the call.
    let (instance, host, bytes) =
        unsafe { (&mut *(instance as *mut Instance), &*host, batch.as_slice()) };
    let stage_id = instance.init.stage_id.clone();
    contain(&stage_id, || {
        let records = decode_batch(bytes).map_err(StageError::new)?;
        let mut link = FfiLink { host };
        let mut ctx = Context::new(&mut link, &instance.init, round);
        instance.stage.on_batch(&mut ctx, port as usize, records)
    })
}

unsafe extern "C" fn ffi_on_round_end(
    instance: *mut c_void,
    host: *const HostCallbacks,
    round: u64,
) -> OwnedBytes {
    // SAFETY: as in `ffi_on_batch`.
    let (instance, host) = unsafe { (&mut *(instance as *mut Instance), &*host) };
    let stage_id = instance.init.stage_id.clone();
    contain(&stage_id, || {
        let mut link = FfiLink { host };
        let mut ctx = Context::new(&mut link, &instance.init, round);
        instance.stage.on_round_end(&mut ctx)
    })
}

unsafe extern "C" fn ffi_snapshot(
    instance: *mut c_void,
    round: u64,
    out: *mut OwnedBytes,
) -> OwnedBytes {
    // SAFETY: as in `ffi_on_batch`; `out` is a valid out-pointer.
    let instance = unsafe { &mut *(instance as *mut Instance) };
    let stage_id = instance.init.stage_id.clone();
    contain(&stage_id, || {
        let state = instance.stage.snapshot(round)?;
        let bytes = state
            .map(OwnedBytes::from_vec)
            .unwrap_or_else(OwnedBytes::empty);
        // SAFETY: the host passes a valid out-pointer.
        unsafe { out.write(bytes) };
        Ok(())
    })
}

unsafe extern "C" fn ffi_restore(instance: *mut c_void, round: u64, state: Bytes) -> OwnedBytes {
    // SAFETY: as in `ffi_on_batch`.
    let (instance, bytes) = unsafe { (&mut *(instance as *mut Instance), state.as_slice()) };
    let stage_id = instance.init.stage_id.clone();
    contain(&stage_id, || instance.stage.restore(round, bytes))
}

unsafe extern "C" fn ffi_destroy(instance: *mut c_void) {
    if !instance.is_null() {
        // A panicking Drop must not cross the boundary either.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `instance` came from `ffi_create` and is destroyed once.
            drop(unsafe { Box::from_raw(instance as *mut Instance) });
        }));
    }
}

unsafe extern "C" fn ffi_free(buf: OwnedBytes) {
    if !buf.ptr.is_null() {
        // SAFETY: the buffer was made by `OwnedBytes::from_vec` in this library.
        drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
    }
}

/// Exports stage types as a hone plugin library.
///
/// ```ignore
/// hone_sdk::export_stages!(ReadPairs, WritePairs);
/// ```
#[macro_export]
macro_rules! export_stages {
    ($($stage:ty),+ $(,)?) => {
        /// The hone plugin entry point (generated by `export_stages!`).
        #[no_mangle]
        pub extern "C" fn hone_plugin_entry_v1() -> *const $crate::abi::PluginTable {
            fn factories() -> ::std::vec::Vec<$crate::abi::Factory> {
                ::std::vec![$($crate::abi::Factory::of::<$stage>()),+]
            }
            $crate::abi::plugin_table(factories)
        }
    };
}
