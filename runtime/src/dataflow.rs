//! The pipeline as a timely dataflow. Rounds are timestamps (`u64`); every
//! stage is one operator that feeds batches to its plugin instance as they
//! arrive and calls its round end once the input frontier has passed the
//! round. Feedback edges carry round `t` output into round `t + 1`.

use crate::last_breath::{self, Call};
use crate::pipeline::{Edge, ResolvedPipeline};
use crate::plugin::{Emitted, Registry, StageInstance};
use crate::report::{Report, Reporter};
use crate::rundir::{EventLog, Plan};
use hone_sdk::{Event, Placement, Record, StageInit};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract, Pipeline};
use timely::dataflow::operators::generic::operator::{empty, Operator};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, ConnectLoop, Feedback};
use timely::dataflow::Stream;
use timely::worker::Worker;

/// What flows on the dataflow's edges.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    /// A record on a port (an output port leaving a stage, an input port entering one).
    Data(u32, Record),
    /// A metric or artifact on its way to worker 0, which writes the run directory.
    Event(RoutedEvent),
    /// A snapshot file written at a round's end: its round, path relative to
    /// the run directory, and sha256, on its way to the journal.
    Snapshot(u64, String, String),
}

/// An event with where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutedEvent {
    /// The stage id.
    pub stage: String,
    /// The worker.
    pub worker: usize,
    /// The round.
    pub round: u64,
    /// When the stage raised it (seconds since the Unix epoch).
    pub time: f64,
    /// The event.
    pub event: Event,
}

type MsgStream<'s> = Stream<'s, u64, Vec<Msg>>;

/// A stage that failed, as the runtime reports it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The stage id.
    pub stage: String,
    /// The worker it failed on.
    pub worker: usize,
    /// The error.
    pub error: hone_sdk::StageError,
    /// Whether it failed while being created (a config problem, exit 2).
    pub at_create: bool,
}

/// Everything the workers of one process share.
pub struct RunShared {
    /// The validated pipeline.
    pub pipeline: ResolvedPipeline,
    /// The loaded plugins.
    pub registry: Registry,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Stage failures, in the order they happened.
    pub failures: Mutex<Vec<Failure>>,
    /// Progress and log lines.
    pub reporter: Reporter,
    /// Set by the first failure: every stage of this process stops, so a
    /// failed run ends promptly instead of training on for hours.
    pub abort: AtomicBool,
    /// The run directory's plan, carried out by worker 0 once every stage of
    /// the process is created (`None`: carried out before the dataflow, as
    /// in a cluster run, or by another process).
    pub plan: Option<(Plan, String)>,
    /// Whether the run directory is ready: nothing is written before.
    pub committed: AtomicBool,
    /// Why the run directory could not be made ready.
    pub setup_error: Mutex<Option<String>>,
    /// The workers of this process meet here once their stages are created.
    pub created: Barrier,
    /// A continued run: the last completed round and its verified
    /// snapshots. The dataflow starts at the round after it.
    pub resume: Option<crate::snapshots::Resumable>,
    /// Live figures for `hone serve` (kept in every run; cheap).
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

impl RunShared {
    /// The first round this process runs.
    pub fn start_round(&self) -> u64 {
        self.resume.as_ref().map_or(0, |r| r.round + 1)
    }
}

/// Where a per-member stage's member 0 is placed: members are dealt to
/// workers round-robin across all per-member stages in pipeline order, so
/// that several one-member stages (say, reward models trained on different
/// data) run on different workers instead of all on worker 0. Member `m` of
/// stage `stage` runs on worker `(offset + m) mod N`.
pub fn member_offset(pipeline: &ResolvedPipeline, stage: usize) -> usize {
    pipeline.stages[..stage]
        .iter()
        .filter(|s| matches!(s.descriptor.placement, Placement::PerMember { .. }))
        .map(|s| s.members)
        .sum()
}

/// Builds the dataflow on one worker.
pub fn build(worker: &mut Worker, shared: Arc<RunShared>) {
    let index = worker.index();
    let peers = worker.peers();
    worker.dataflow::<u64, _, _>(|scope| {
        let p = &shared.pipeline;
        let rounds = p.pipeline.rounds;
        let n = p.stages.len();
        let mut loops = Vec::new();
        let mut loop_inputs: Vec<Vec<MsgStream>> = vec![Vec::new(); n];
        let last = if rounds == 0 { None } else { Some(rounds - 1) };
        for (to, stage) in p.stages.iter().enumerate() {
            for edge in stage.edges.iter().filter(|e| e.feedback) {
                let (handle, stream) = scope.feedback::<Vec<Msg>>(1);
                loop_inputs[to].push(stream);
                loops.push((handle, edge.clone()));
                // Replayed records are already at the round they land in:
                // the stage drops what is past the last round itself.
                if let Some(replay) = replay(scope, &shared, edge, index) {
                    loop_inputs[to].push(route(replay, edge, None));
                }
            }
        }
        // A run without a last round is paced: round `r` may end only once
        // round `r - 1` is journalled, so sources do not race ahead.
        let clock = (rounds == 0).then(|| clock(scope, shared.clone()));
        let mut outputs: Vec<Option<MsgStream>> = vec![None; n];
        for &s in &p.order {
            let stage = &p.stages[s];
            let mut inputs: Vec<MsgStream> = stage
                .edges
                .iter()
                .filter(|e| !e.feedback)
                .map(|e| route(outputs[e.from].clone().expect("topological order"), e, None))
                .collect();
            inputs.append(&mut loop_inputs[s]);
            if let Some(clock) = &clock {
                inputs.push(clock.clone());
            }
            let input = if inputs.is_empty() {
                empty(scope)
            } else {
                scope.concatenate(inputs)
            };
            let op = StageOp::new(shared.clone(), s, index, peers);
            let out = match stage.descriptor.placement {
                Placement::DataParallel => {
                    // Records are sharded by key; artifacts (a policy, a reward
                    // model) are needed by every shard, so they are broadcast.
                    let artifacts = keep(input.clone(), "Artifacts", is_artifact).broadcast();
                    let records = keep(input, "Records", |m| !is_artifact(m));
                    let records = records.unary(Exchange::new(shard), "Shard", |_, _| {
                        |input, output| {
                            input.for_each(|cap, data| output.session(&cap).give_container(data));
                        }
                    });
                    stage_operator(scope.concatenate([records, artifacts]), Pipeline, op)
                }
                Placement::Single => stage_operator(input, Exchange::new(|_: &Msg| 0u64), op),
                Placement::PerMember { .. } => stage_operator(input.broadcast(), Pipeline, op),
            };
            outputs[s] = Some(out);
        }
        for (handle, edge) in loops {
            // `rounds == 0` (`hone serve` until stopped) has no last round.
            route(
                outputs[edge.from].clone().expect("all stages built"),
                &edge,
                last,
            )
            .connect_loop(handle);
        }
        let events: Vec<MsgStream> = outputs.into_iter().flatten().map(events_only).collect();
        let start = shared.start_round();
        let mut log = (index == 0).then(|| EventLog::new(&shared.run_dir, rounds, peers, start));
        let run = shared.clone();
        scope.concatenate(events).sink(
            Exchange::new(|_: &Msg| 0u64),
            "RunDirectory",
            move |(input, frontier)| {
                let log = match log.as_mut() {
                    Some(log) if run.committed.load(Ordering::SeqCst) => log,
                    // No run directory (a stage failed at creation): nothing is written.
                    _ => return input.for_each(|_, data| data.clear()),
                };
                input.for_each(|_, data| {
                    for msg in data.drain(..) {
                        match msg {
                            Msg::Event(e) => {
                                if let Event::Metric { name, value, .. } = &e.event {
                                    run.telemetry.metric(&e.stage, name, *value);
                                }
                                log.record(e)
                            }
                            Msg::Snapshot(round, rel, sha) => log.record_snapshot(round, rel, sha),
                            Msg::Data(..) => {}
                        }
                    }
                });
                let aborted = run.abort.load(Ordering::SeqCst);
                let frontier = frontier.frontier().first().copied();
                log.advance(frontier, aborted);
                run.telemetry.set_completed(log.completed());
                if frontier.is_none() {
                    run.telemetry.set_finished();
                }
            },
        );
    });
    // Every stage of this process is created now, and none has run: only if
    // all were created does worker 0 make the run directory, so a stage that
    // rejects its config leaves nothing behind to refuse the corrected re-run.
    shared.created.wait();
    if let Some((plan, pipeline_toml)) = shared.plan.as_ref().filter(|_| index == 0) {
        if !shared.abort.load(Ordering::SeqCst) {
            match plan.commit(pipeline_toml) {
                Ok(()) => shared.committed.store(true, Ordering::SeqCst),
                Err(e) => {
                    *shared.setup_error.lock().expect("setup lock") = Some(e);
                    shared.abort.store(true, Ordering::SeqCst);
                }
            }
        }
    }
    shared.created.wait();
}

use timely::dataflow::operators::Concatenate;

/// Keeps only the events of a stage's output (records stay on their workers).
fn events_only(stream: MsgStream<'_>) -> MsgStream<'_> {
    keep(stream, "Events", |m| {
        matches!(m, Msg::Event(_) | Msg::Snapshot(..))
    })
}

/// On a continued run, the records `edge`'s source stage sent on this
/// worker in the last completed round, emitted at the first round to run:
/// what the feedback edge would have carried had the run not stopped.
fn replay<'s>(
    scope: timely::dataflow::Scope<'s, u64>,
    shared: &RunShared,
    edge: &Edge,
    worker: usize,
) -> Option<MsgStream<'s>> {
    let resume = shared.resume.as_ref()?;
    let stage = &shared.pipeline.stages[edge.from].decl.id;
    let rel = crate::snapshots::relative(resume.round, stage, worker, "feedback");
    // Every worker builds the same operators (timely matches channels by
    // construction order); one without the stage's instance replays nothing.
    let records = if resume.files.contains_key(&rel) {
        std::fs::read(shared.run_dir.join(&rel))
            .map_err(|e| e.to_string())
            .and_then(|b| crate::snapshots::decode_feedback(&b))
    } else {
        Ok(Vec::new())
    };
    let records = match records {
        Ok(r) => r,
        Err(e) => {
            let error =
                hone_sdk::StageError::new(format!("cannot replay the feedback records {rel}: {e}"));
            shared
                .reporter
                .send(Report::Failed(format!("stage `{stage}` failed: {error}")));
            shared.abort.store(true, Ordering::SeqCst);
            shared
                .failures
                .lock()
                .expect("failures lock")
                .push(Failure {
                    stage: stage.clone(),
                    worker,
                    error,
                    at_create: false,
                });
            Vec::new()
        }
    };
    let start = shared.start_round();
    Some(timely::dataflow::operators::generic::operator::source::<
        u64,
        timely::container::CapacityContainerBuilder<Vec<Msg>>,
        _,
        _,
    >(scope, "Replay", move |cap, _info| {
        let mut cap = Some(cap.delayed(&start));
        let mut records = Some(records);
        move |output| {
            if let Some(c) = cap.take() {
                let mut session = output.session(&c);
                for (port, r) in records.take().unwrap_or_default() {
                    session.give(Msg::Data(port, r));
                }
            }
        }
    }))
}

/// The pace of a run without a last round: holds its capability at the
/// first round not yet allowed to end (the one after the next to complete),
/// and moves it on as rounds are journalled. Once `hone serve` is asked to
/// stop it moves at most to the round after the last one completed then
/// (`Telemetry::request_stop`): that round ends, and no other begins.
fn clock<'s>(scope: timely::dataflow::Scope<'s, u64>, shared: Arc<RunShared>) -> MsgStream<'s> {
    let start = shared.start_round();
    let activations = scope;
    timely::dataflow::operators::generic::operator::source::<
        u64,
        timely::container::CapacityContainerBuilder<Vec<Msg>>,
        _,
        _,
    >(scope, "Clock", move |cap, info| {
        let activator = activations.activator_for(info.address.clone());
        let mut cap = Some(cap.delayed(&(start + 1)));
        move |_output| {
            if shared.abort.load(Ordering::SeqCst) {
                cap = None;
            }
            let Some(c) = cap.as_mut() else { return };
            let allowed = shared.telemetry.completed() + 1;
            if allowed > *c.time() && shared.telemetry.allows(allowed) {
                c.downgrade(&allowed);
            }
            // Looked at again shortly: rounds complete on worker 0's sink.
            activator.activate_after(std::time::Duration::from_millis(20));
        }
    })
}

fn is_artifact(m: &Msg) -> bool {
    matches!(m, Msg::Data(_, Record::Artifact(_)))
}

/// Keeps the messages `pred` accepts, on the same worker.
fn keep<'s>(stream: MsgStream<'s>, name: &str, pred: fn(&Msg) -> bool) -> MsgStream<'s> {
    stream.unary(Pipeline, name, move |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                let mut session = output.session(&cap);
                for msg in data.drain(..) {
                    if pred(&msg) {
                        session.give(msg);
                    }
                }
            });
        }
    })
}

fn shard(m: &Msg) -> u64 {
    match m {
        Msg::Data(_, r) => r.shard_key(),
        Msg::Event(_) | Msg::Snapshot(..) => 0,
    }
}

/// Keeps the records of one output port and relabels them with the input
/// port they feed. With `last`, drops what would arrive after the last round.
fn route<'s>(stream: MsgStream<'s>, edge: &Edge, last: Option<u64>) -> MsgStream<'s> {
    let (from_port, to_port) = (edge.from_port as u32, edge.to_port as u32);
    stream.unary(Pipeline, "Route", move |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                if last.is_some_and(|l| cap.least().is_some_and(|t| *t >= l)) {
                    return;
                }
                let mut session = output.session(&cap);
                for msg in data.drain(..) {
                    if let Msg::Data(p, r) = msg {
                        if p == from_port {
                            session.give(Msg::Data(to_port, r));
                        }
                    }
                }
            });
        }
    })
}

/// The state of one stage's operator on one worker.
struct StageOp {
    shared: Arc<RunShared>,
    stage: usize,
    worker: usize,
    instance: Option<StageInstance>,
    next_round: u64,
    stash: BTreeMap<u64, Vec<Msg>>,
    /// This stage's output ports that feed a feedback edge, and what it
    /// sent on them this round (saved with its snapshot).
    feedback_ports: Vec<u32>,
    feedback_out: Vec<(u32, Record)>,
}

impl StageOp {
    fn new(shared: Arc<RunShared>, stage: usize, worker: usize, peers: usize) -> Self {
        let feedback_ports = shared
            .pipeline
            .stages
            .iter()
            .flat_map(|s| s.edges.iter())
            .filter(|e| e.feedback && e.from == stage)
            .map(|e| e.from_port as u32)
            .collect();
        let next_round = shared.start_round();
        let mut op = StageOp {
            shared,
            stage,
            worker,
            instance: None,
            next_round,
            stash: BTreeMap::new(),
            feedback_ports,
            feedback_out: Vec::new(),
        };
        let s = &op.shared.pipeline.stages[stage];
        let members: Vec<usize> = match s.descriptor.placement {
            Placement::DataParallel => vec![0],
            Placement::Single => {
                if worker == 0 {
                    vec![0]
                } else {
                    vec![]
                }
            }
            Placement::PerMember { .. } => {
                let offset = member_offset(&op.shared.pipeline, stage);
                (0..s.members)
                    .filter(|m| (offset + m) % peers == worker)
                    .collect()
            }
        };
        if members.is_empty() {
            return op;
        }
        let init = StageInit {
            stage_id: s.decl.id.clone(),
            kind: s.decl.kind.clone(),
            config: s.config.clone(),
            worker,
            workers: peers,
            members,
            run_dir: op.shared.run_dir.clone(),
            rounds: op.shared.pipeline.pipeline.rounds,
            seed: op.shared.pipeline.pipeline.seed,
        };
        let kind = &op.shared.registry.kinds[&s.decl.kind];
        let call = last_breath::enter(worker, stage, 0, Call::Create);
        let created = StageInstance::create(kind, &init);
        drop(call);
        match created {
            Ok(instance) => op.instance = Some(instance),
            Err(error) => op.fail(error, true),
        }
        op.restore();
        op
    }

    /// On a continued run, restores the instance from its snapshot of the
    /// last completed round, if it saved one (a stage that keeps nothing
    /// across rounds saves none and starts fresh).
    fn restore(&mut self) {
        let Some(resume) = self.shared.resume.clone() else {
            return;
        };
        let rel = crate::snapshots::relative(resume.round, self.id(), self.worker, "state");
        if !resume.files.contains_key(&rel) {
            return;
        }
        let run_dir = self.shared.run_dir.clone();
        let Some(instance) = self.instance.as_mut() else {
            return;
        };
        let result = std::fs::read(run_dir.join(&rel))
            .map_err(|e| hone_sdk::StageError::new(format!("cannot read snapshot {rel}: {e}")))
            .and_then(|bytes| instance.restore(resume.round, &bytes))
            .map_err(|e| hone_sdk::StageError::new(format!("cannot restore from {rel}: {e}")));
        if let Err(e) = result {
            self.fail(e, false);
        }
    }

    /// After round `round` ended: writes the instance's snapshot and the
    /// records it sent on feedback edges, unless it was the last round.
    fn snapshot(&mut self, round: u64, out: &mut impl FnMut(Msg)) {
        let feedback = std::mem::take(&mut self.feedback_out);
        let rounds = self.shared.pipeline.pipeline.rounds;
        if rounds != 0 && round + 1 >= rounds {
            return;
        }
        let Some(instance) = self.instance.as_mut() else {
            return;
        };
        if !instance.can_snapshot() {
            // Its plugin predates snapshots: the journal says so, and a
            // resume re-runs instead of continuing without its state.
            let rel = format!("{}{}", crate::snapshots::CANNOT, self.id());
            return out(Msg::Snapshot(round, rel, String::new()));
        }
        let state = match instance.snapshot(round) {
            Ok(state) => state,
            Err(e) => return self.fail(e, false),
        };
        let mut files = Vec::new();
        if let Some(bytes) = state {
            files.push(("state", Ok(bytes)));
        }
        if !self.feedback_ports.is_empty() {
            files.push(("feedback", crate::snapshots::encode_feedback(&feedback)));
        }
        for (kind, bytes) in files {
            let rel = crate::snapshots::relative(round, self.id(), self.worker, kind);
            match bytes.and_then(|b| crate::snapshots::write(&self.shared.run_dir, &rel, &b)) {
                Ok(sha) => out(Msg::Snapshot(round, rel, sha)),
                Err(e) => return self.fail(hone_sdk::StageError::new(e), false),
            }
        }
    }

    fn id(&self) -> &str {
        &self.shared.pipeline.stages[self.stage].decl.id
    }

    fn fail(&mut self, error: hone_sdk::StageError, at_create: bool) {
        let failure = Failure {
            stage: self.id().to_string(),
            worker: self.worker,
            error,
            at_create,
        };
        self.shared.reporter.send(Report::Failed(format!(
            "stage `{}` failed: {}",
            failure.stage, failure.error
        )));
        self.shared.abort.store(true, Ordering::SeqCst);
        self.shared
            .failures
            .lock()
            .expect("failures lock")
            .push(failure);
        self.instance = None;
    }

    /// Hands a call's output to the dataflow and the reporter.
    fn deliver(&mut self, emitted: Emitted, round: u64, out: &mut impl FnMut(Msg)) {
        for (port, batch) in emitted.records {
            let fed_back = self.feedback_ports.contains(&port);
            for record in batch {
                if fed_back {
                    self.feedback_out.push((port, record.clone()));
                }
                out(Msg::Data(port, record));
            }
        }
        for (time, event) in emitted.events {
            out(Msg::Event(RoutedEvent {
                stage: self.id().to_string(),
                worker: self.worker,
                round,
                time,
                event,
            }));
        }
    }

    /// Collects a call's output; progress and log lines go to the terminal
    /// at once.
    fn emitted(&self) -> Emitted {
        let reporter = self.shared.reporter.clone();
        let stage = self.id().to_string();
        let worker = self.worker;
        Emitted::with_live_events(move |event| match event {
            Event::Progress { label, done, total } => {
                last_breath::heard(worker);
                let stage = stage.clone();
                reporter.send(Report::Progress {
                    stage,
                    label,
                    done,
                    total,
                });
                None
            }
            Event::Log { message } => {
                last_breath::heard(worker);
                reporter.send(Report::Log(format!("[{stage}] {message}")));
                None
            }
            other => Some(other),
        })
    }

    fn feed(&mut self, round: u64, msgs: Vec<Msg>, out: &mut impl FnMut(Msg)) {
        // Group consecutive records of one port into a batch.
        let mut batches: Vec<(u32, Vec<Record>)> = Vec::new();
        for msg in msgs {
            if let Msg::Data(port, r) = msg {
                match batches.last_mut() {
                    Some((p, b)) if *p == port => b.push(r),
                    _ => batches.push((port, vec![r])),
                }
            }
        }
        let (telemetry, id) = (self.shared.telemetry.clone(), self.id().to_string());
        for (port, batch) in batches {
            let mut emitted = self.emitted();
            let Some(instance) = self.instance.as_mut() else {
                return;
            };
            let call = last_breath::enter(self.worker, self.stage, round, Call::Batch);
            telemetry.enter(&id, round);
            let timer = std::time::Instant::now();
            let result = instance.on_batch(port, round, &batch, &mut emitted);
            telemetry.leave(&id, timer.elapsed());
            drop(call);
            self.deliver(emitted, round, out);
            if let Err(e) = result {
                self.fail(e, false);
            }
        }
    }

    fn round_end(&mut self, round: u64, out: &mut impl FnMut(Msg)) {
        let (telemetry, id) = (self.shared.telemetry.clone(), self.id().to_string());
        let mut emitted = self.emitted();
        let Some(instance) = self.instance.as_mut() else {
            return;
        };
        let call = last_breath::enter(self.worker, self.stage, round, Call::RoundEnd);
        telemetry.enter(&id, round);
        let timer = std::time::Instant::now();
        let result = instance.on_round_end(round, &mut emitted);
        telemetry.leave(&id, timer.elapsed());
        drop(call);
        self.deliver(emitted, round, out);
        match result {
            Err(e) => self.fail(e, false),
            Ok(()) => self.snapshot(round, out),
        }
    }
}

fn stage_operator<'s, P>(input: MsgStream<'s>, pact: P, mut op: StageOp) -> MsgStream<'s>
where
    P: ParallelizationContract<u64, Vec<Msg>>,
{
    let name = format!("Stage({})", op.id());
    let rounds = op.shared.pipeline.pipeline.rounds;
    input.unary_frontier(pact, &name, move |mut cap, _info| {
        // A continued run starts at the round after the last completed one.
        cap.downgrade(&op.next_round);
        let mut cap: Option<Capability<u64>> = op.instance.is_some().then_some(cap);
        move |(input, frontier), output| {
            input.for_each(|time, data| {
                let Some(&t) = time.least() else { return };
                if rounds == 0 || t < rounds {
                    op.stash.entry(t).or_default().append(data);
                }
            });
            if op.shared.abort.load(Ordering::SeqCst) {
                op.instance = None;
                cap = None;
            }
            loop {
                let Some(c) = cap.as_mut() else {
                    op.stash.clear();
                    break;
                };
                let round = op.next_round;
                let mut session = output.session(c);
                let mut give = |m: Msg| session.give(m);
                if let Some(msgs) = op.stash.remove(&round) {
                    op.feed(round, msgs, &mut give);
                }
                if frontier.less_equal(&round) {
                    break;
                }
                op.round_end(round, &mut give);
                drop(session);
                op.next_round += 1;
                if op.instance.is_none() || (rounds != 0 && op.next_round >= rounds) {
                    cap = None;
                } else {
                    c.downgrade(&op.next_round);
                }
            }
        }
    })
}
