//! The `testing` stage family: synthetic data and failure injection, for
//! hone's own tests and benchmarks (and for checking a deployment).

use hone_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct GenerateConfig {
    count: u64,
    prompts: u64,
    every_round: bool,
}

/// Emits synthetic preference pairs.
pub struct GeneratePairs {
    config: GenerateConfig,
}

impl StageFactory for GeneratePairs {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "testing.generate-pairs",
            "Emits synthetic preference pairs (for tests and benchmarks).",
        )
        .output("pairs", RecordKind::PreferencePair)
        .optional("count", FieldType::unsigned(), 1000, "Pairs to emit.")
        .optional(
            "prompts",
            FieldType::unsigned(),
            0,
            "Distinct prompts to cycle through (0 = one per pair).",
        )
        .optional(
            "every_round",
            FieldType::Bool,
            false,
            "Emit in every round, not just round 0.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        Ok(GeneratePairs {
            config: init.config()?,
        })
    }
}

impl Stage for GeneratePairs {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        if ctx.round() > 0 && !self.config.every_round {
            return Ok(());
        }
        let round = ctx.round();
        for i in 0..self.config.count {
            let p = if self.config.prompts == 0 {
                i
            } else {
                i % self.config.prompts
            };
            let pair = PreferencePair::new(
                format!("gen:{round}:{i:09}"),
                format!("prompt number {p}: say something helpful"),
                format!("a helpful and complete answer, variant {}", i % 97),
                format!("an unhelpful reply {}", i % 89),
                "synthetic",
            );
            ctx.emit(0, Record::Pair(pair));
        }
        ctx.metric("generated", self.config.count as f64);
        Ok(())
    }
}

#[derive(Deserialize)]
struct FaultConfig {
    mode: String,
    after: u64,
    message: String,
    exit_code: u8,
    only_if_env: String,
}

/// Passes records through, then fails (panics or errors) after N records.
pub struct Fault {
    config: FaultConfig,
    seen: u64,
}

impl StageFactory for Fault {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "testing.fault",
            "Passes records through, then fails after `after` records: panics, returns an error, \
             aborts the process, calls exit(), or hangs (to test how hone reports each).",
        )
        .input("records", RecordKind::Any)
        .output("records", RecordKind::Any)
        .placement(Placement::DataParallel)
        .optional(
            "mode",
            FieldType::one_of(&["panic", "error", "abort", "exit", "hang"]),
            "panic",
            "How to fail.",
        )
        .optional(
            "exit_code",
            FieldType::range(0, 255),
            3,
            "The status `mode = \"exit\"` passes to exit().",
        )
        .optional(
            "after",
            FieldType::unsigned(),
            0,
            "Records to pass before failing.",
        )
        .optional(
            "message",
            FieldType::String,
            "injected fault",
            "The panic or error message.",
        )
        .optional(
            "only_if_env",
            FieldType::String,
            "",
            "Fail only while this environment variable is set (a crash in one attempt that a resume \
             without it gets past); empty: always.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        Ok(Fault {
            config: init.config()?,
            seen: 0,
        })
    }
}

impl Fault {
    fn trip(&self) -> Result<(), StageError> {
        let env = &self.config.only_if_env;
        if !env.is_empty() && std::env::var_os(env).is_none() {
            return Ok(());
        }
        match self.config.mode.as_str() {
            "panic" => panic!("{}", self.config.message),
            "abort" => std::process::abort(),
            "exit" => std::process::exit(self.config.exit_code.into()),
            "hang" => loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            _ => Err(StageError::new(self.config.message.clone())),
        }
    }
}

impl Stage for Fault {
    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        hone_sdk::snapshot::encode("testing.fault", &self.seen).map(Some)
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        self.seen = hone_sdk::snapshot::decode("testing.fault", round, snapshot)?;
        Ok(())
    }

    fn on_batch(
        &mut self,
        ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for r in batch {
            if self.seen >= self.config.after {
                // Returns only when disarmed (only_if_env unset): pass on.
                self.trip()?;
            }
            self.seen += 1;
            ctx.emit(0, r);
        }
        Ok(())
    }

    fn on_round_end(&mut self, _ctx: &mut Context) -> Result<(), StageError> {
        if self.seen >= self.config.after {
            self.trip()?;
        }
        Ok(())
    }
}

/// Emits, at each round's end, what it received in the round plus what it
/// emitted in the previous round (through a feedback edge): round `t` emits
/// the input of rounds `0..=t`.
#[derive(Default)]
pub struct Accumulate {
    buffer: Vec<Record>,
}

impl StageFactory for Accumulate {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "testing.accumulate",
            "Emits its round's input plus its previous round's output (wire `previous` as feedback).",
        )
        .input("records", RecordKind::Any)
        .input("previous", RecordKind::Any)
        .output("records", RecordKind::Any)
    }

    fn create(_init: &StageInit) -> Result<Self, StageError> {
        Ok(Accumulate::default())
    }
}

impl Stage for Accumulate {
    fn on_batch(
        &mut self,
        _ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        self.buffer.extend(batch);
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        let records = std::mem::take(&mut self.buffer);
        ctx.metric("emitted", records.len() as f64);
        for r in records {
            ctx.emit(0, r);
        }
        Ok(())
    }
}

/// Passes every record through unchanged (measures the plugin boundary).
pub struct Passthrough;

impl StageFactory for Passthrough {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "testing.passthrough",
            "Passes every record through unchanged.",
        )
        .input("records", RecordKind::Any)
        .output("records", RecordKind::Any)
        .placement(Placement::DataParallel)
    }

    fn create(_init: &StageInit) -> Result<Self, StageError> {
        Ok(Passthrough)
    }
}

impl Stage for Passthrough {
    fn on_batch(
        &mut self,
        ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        for r in batch {
            ctx.emit(0, r);
        }
        Ok(())
    }
}

/// Counts and drops every record: a sink that costs nothing. It keeps its
/// count across rounds (metric `total`) and snapshots it: the toy stage for
/// snapshot and restore.
#[derive(Default)]
pub struct Discard {
    received: u64,
    total: u64,
}

impl StageFactory for Discard {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "testing.discard",
            "Counts records (metric `received` per round, `total` over the rounds so far) and drops them; snapshots its total.",
        )
        .input("records", RecordKind::Any)
        .placement(Placement::DataParallel)
    }

    fn create(_init: &StageInit) -> Result<Self, StageError> {
        Ok(Discard::default())
    }
}

impl Stage for Discard {
    fn on_batch(
        &mut self,
        _ctx: &mut Context,
        _port: usize,
        batch: Vec<Record>,
    ) -> Result<(), StageError> {
        self.received += batch.len() as u64;
        Ok(())
    }

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        self.total += self.received;
        ctx.metric("received", self.received as f64);
        ctx.metric("total", self.total as f64);
        self.received = 0;
        Ok(())
    }

    fn snapshot(&mut self, _round: u64) -> Result<Option<Vec<u8>>, StageError> {
        Ok(Some(self.total.to_le_bytes().to_vec()))
    }

    fn restore(&mut self, round: u64, snapshot: &[u8]) -> Result<(), StageError> {
        let bytes: [u8; 8] = snapshot.try_into().map_err(|_| {
            StageError::new(format!(
                "the snapshot of round {round} holds {} bytes, not a count's 8",
                snapshot.len()
            ))
        })?;
        self.total = u64::from_le_bytes(bytes);
        Ok(())
    }
}

#[derive(Deserialize)]
struct PaceConfig {
    ticks: u64,
    interval_ms: u64,
}

/// Raises a metric `tick` at steps 0..ticks, pausing between them, all in
/// one call: the metrics' times in `metrics.jsonl` must be when each was
/// raised, not when the call returned or the writer saw them.
pub struct Pace {
    config: PaceConfig,
}

impl StageFactory for Pace {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "testing.pace",
            "Raises metric `tick` at steps 0..ticks, `interval_ms` apart, in one call (to test metric times).",
        )
        .optional("ticks", FieldType::range(0, 1000), 3, "Metrics to raise.")
        .optional(
            "interval_ms",
            FieldType::range(0, 60_000),
            500,
            "Pause between two ticks, in milliseconds.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        Ok(Pace {
            config: init.config()?,
        })
    }
}

impl Stage for Pace {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        for step in 0..self.config.ticks {
            if step > 0 {
                std::thread::sleep(std::time::Duration::from_millis(self.config.interval_ms));
            }
            ctx.metric_at("tick", step as f64, step);
        }
        Ok(())
    }
}

hone_sdk::export_stages!(GeneratePairs, Fault, Accumulate, Passthrough, Discard, Pace);
