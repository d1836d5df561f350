//! `hone report`: a self-contained HTML file, checked by hand and rendered in
//! headless Chromium (installed by `.ci/run`).

use hone_tests::{hone, text, workspace, TempDir};
use std::fmt::Write;
use std::path::Path;
use std::process::Command;

/// A metrics.jsonl with data for every section, plus one malformed line.
fn synthetic(dir: &TempDir) {
    let mut m = String::new();
    let mut line = |stage: &str,
                    round: u64,
                    worker: u64,
                    name: &str,
                    value: f64,
                    step: Option<f64>| {
        let step = step.map(|s| s.to_string()).unwrap_or("null".into());
        let _ = writeln!(
            m,
            r#"{{"stage":"{stage}","round":{round},"worker":{worker},"name":"{name}","value":{value},"step":{step},"time":0.0}}"#
        );
    };
    for s in 0..50 {
        let s = s as f64;
        line("sft", 0, 0, "train_loss", 3.0 / (1.0 + s / 10.0), Some(s));
        if (s as u64).is_multiple_of(10) {
            line("sft", 0, 0, "eval_loss", 3.2 / (1.0 + s / 12.0), Some(s));
        }
        line("rm", 0, 0, "loss", 0.7 - s / 200.0, Some(s));
    }
    for n in [1u32, 2, 4, 8, 16, 32, 64] {
        let n = n as f64;
        let kl = n.ln() - (n - 1.0) / n;
        line("bon", 0, 0, "kl", kl, Some(n));
        line("bon", 0, 0, "proxy_reward", 0.2 + 0.3 * kl, Some(n));
        line(
            "bon",
            0,
            0,
            "gold_reward",
            0.2 + 0.4 * kl - 0.12 * kl * kl,
            Some(n),
        );
    }
    line("eval", 0, 0, "win_rate/rlhf_vs_sft", 0.71, None);
    line("eval", 0, 0, "win_rate/sft_vs_base", 0.64, None);
    line("eval", 0, 0, "elo/sft", 1010.0, None);
    line("eval", 0, 0, "elo/rlhf", 1090.5, None);
    line("eval", 0, 0, "elo/base", 900.0, None);
    for (i, c) in [5.0, 12.0, 30.0, 22.0, 9.0, 3.0].iter().enumerate() {
        line(
            "prefs",
            0,
            0,
            &format!("strength_hist/{}", i as f64 * 0.5),
            *c,
            None,
        );
        line(
            "prefs",
            0,
            1,
            &format!("strength_hist/{}", i as f64 * 0.5),
            1.0,
            None,
        );
    }
    line("rm", 0, 0, "accuracy/clean", 0.81, None);
    line("rm", 0, 0, "accuracy/ood", 0.66, None);
    line("warm", 0, 0, "accuracy/clean", 0.84, None);
    line("warm", 0, 0, "longer_wins/clean", 0.4375, None);
    line("prefs", 0, 0, "pairs", 100.0, None);
    line("prefs", 0, 1, "pairs", 60.0, None);
    m.push_str("{not json\n");
    dir.write("metrics.jsonl", &m);
    dir.write(
        "journal.jsonl",
        "{\"completed\":true,\"round\":0,\"time\":0.0}\n",
    );
    dir.write("pipeline.toml", "[pipeline]\nname = \"synthetic\"\n");
    // What eval.compare writes: the Before-and-after section.
    std::fs::create_dir_all(dir.join("outputs/compare")).unwrap();
    dir.write(
        "outputs/compare/comparison.json",
        r#"{"before_name": "SmolLM2", "after_name": "best of 4", "prompts": 2, "same": 1,
            "length": {"before": 90.5, "after": 120.0},
            "scores": {"judge_reward": {"before": -0.5, "after": 0.25, "gain": 0.75, "gain_se": 0.125, "after_wins": 0.75}},
            "examples": [{"prompt": "\n\nHuman: <img src=x onerror=alert(1)>\n\nAssistant:",
                          "before": {"text": "plain <i>answer</i>", "scores": {"judge_reward": -0.5}},
                          "after": {"text": "kinder answer", "scores": {"judge_reward": 0.25}}}]}"#,
    );
    dir.write(
        "manifest.jsonl",
        "{\"id\":\"rm/final@0\",\"kind\":\"reward_model\",\"stage\":\"rm\",\"round\":0,\"sha256\":\"0123456789abcdef0123\"}\n",
    );
}

/// No external resources: every src/href is local or inline.
fn assert_self_contained(html: &str) {
    for attr in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "href='http",
        "<script src",
        "<link",
        "@import",
        "url(http",
    ] {
        assert!(
            !html.contains(attr),
            "external reference `{attr}` in report"
        );
    }
}

/// Renders `html` in headless Chromium; returns (dumped DOM, stderr).
fn chromium(html: &Path, tmp: &TempDir) -> (String, String) {
    let found = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output();
    assert!(
        found.map(|o| o.status.success()).unwrap_or(false),
        "chromium is not installed: `.ci/run` installs it (apt-get install chromium)"
    );
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", tmp.join("chrome").display()),
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            &format!("file://{}", html.display()),
        ])
        .output()
        .expect("chromium runs");
    let (dom, err) = text(&out);
    assert!(out.status.success(), "chromium failed: {err}");
    assert!(!err.contains("Uncaught"), "script error: {err}");
    assert!(!err.contains(":CONSOLE("), "console message: {err}");
    (dom, err)
}

#[test]
fn synthetic_run_has_every_section_and_renders() {
    let dir = TempDir::new("report-syn");
    synthetic(&dir);
    let out = hone(&workspace(), &["report", dir.0.to_str().unwrap()]);
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{o}{e}");
    assert!(
        e.contains("metrics.jsonl:") && e.contains("skipped"),
        "malformed line reported with file:line: {e}"
    );
    let path = dir.join("report.html");
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    // losses: sft and rm; reward against KL; win rates; strength histogram.
    assert_eq!(html.matches("<svg").count(), 5, "one svg per plot");
    for needle in [
        "synthetic",
        "rlhf",
        "1090.5",
        "accuracy",
        "clean",
        "ood",
        "0123456789ab",
        "eval_loss",
        "gold",
        "proxy",
        "best of 4 against SmolLM2",
        "0.75 ± 0.125",
        "kinder answer",
        "warm: longer response wins",
        "0.4375",
        "plain &lt;i&gt;answer&lt;/i&gt;",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    assert!(!html.contains("<img"), "prompt markup is escaped");
    assert!(!html.contains("No data"), "every section has data");
    assert!(
        html.contains("<td class=\"n\">160</td>"),
        "pairs summed over workers"
    );
    let (dom, _) = chromium(&path, &dir);
    assert_eq!(dom.matches("<svg").count(), 5, "svgs in the rendered DOM");
    assert!(
        dom.contains("<path") && dom.contains("<rect"),
        "plots have marks"
    );
}

#[test]
fn real_run_renders_and_notes_missing_sections() {
    let dir = TempDir::new("report-hh");
    let run = dir.join("run");
    let out = hone(
        &workspace(),
        &[
            "run",
            "pipelines/hh-filter.toml",
            "--run-dir",
            run.to_str().unwrap(),
            "-q",
            "--report",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    // --report wrote the run's own report.
    let own = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(own.contains("hh-filter"));
    let html_path = dir.join("r.html");
    let out = hone(
        &workspace(),
        &[
            "report",
            run.to_str().unwrap(),
            "--out",
            html_path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert_self_contained(&html);
    assert!(
        html.contains("hh-filter") && html.contains("No data"),
        "{html}"
    );
    assert!(html.contains("Counts"));
    chromium(&html_path, &dir);
}

#[test]
fn not_a_run_directory_exits_2() {
    let dir = TempDir::new("report-none");
    let out = hone(&workspace(), &["report", dir.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out)
        .1
        .contains("not a hone run directory (no metrics.jsonl)"));
}

/// `pipelines/bon-reward-hacking.toml`, shrunk with `--set` to seconds, runs
/// end to end and its report has the losses, gold and proxy reward against
/// KL, the win rate, the Elo table and the RM accuracy table.
#[test]
fn shrunk_best_of_n_pipeline_runs_and_its_report_renders() {
    let dir = TempDir::new("report-bon");
    let run = dir.join("run");
    let mut args = vec![
        "run".to_string(),
        "pipelines/bon-reward-hacking.toml".into(),
        "--run-dir".into(),
        run.to_str().unwrap().into(),
        "--workers".into(),
        "2".into(),
        "-q".into(),
    ];
    for set in [
        "sft_prompts.count=60",
        "sft.steps=6",
        "rm_prompts.count=16",
        "rm_samples.n=2",
        "rm_demos.steps=4",
        "rm_policy.steps=4",
        "test_prompts.count=12",
        "ood_prompts.count=12",
        "bon_prompts.count=6",
        "rollout.n=8",
        "bon_demos.keep=8",
        "bon_policy.keep=8",
        "rollout.max_new_tokens=12",
        "rm_samples.max_new_tokens=12",
    ] {
        args.push("--set".into());
        args.push(set.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = hone(&workspace(), &args);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let out = hone(&workspace(), &["report", run.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let path = run.join("report.html");
    let html = std::fs::read_to_string(&path).unwrap();
    assert_self_contained(&html);
    for needle in [
        "bon_policy",
        "bon_demos",
        "bon64_rm_policy",
        "clean_in_dist",
        "clean_ood",
        "train_loss",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    // Losses of sft, rm_demos and rm_policy; reward against KL; win rates.
    let svgs = html.matches("<svg").count();
    assert!(svgs >= 5, "{svgs} plots");
    let (dom, _) = chromium(&path, &dir);
    assert_eq!(dom.matches("<svg").count(), svgs);
}

/// A loop's run: its figures by round, Elo with intervals and a win rate
/// with its standard error in the last round.
#[test]
fn a_loop_gets_figures_across_rounds_and_intervals() {
    let dir = TempDir::new("report-loop");
    let mut m = String::new();
    let mut line = |stage: &str, round: u64, name: &str, value: f64| {
        let _ = writeln!(
            m,
            r#"{{"stage":"{stage}","round":{round},"worker":0,"name":"{name}","value":{value},"step":0,"time":0.0}}"#
        );
    };
    for r in 0..4u64 {
        line("online_rewards", r, "gold_reward", 0.1 + 0.01 * r as f64);
        line("online_rewards", r, "length", 20.0 + r as f64);
        line("online_rewards", r, "kl", 0.5 * r as f64);
    }
    // A one-round stage draws no line.
    line("offline_rewards", 0, "gold_reward", 0.12);
    line("elo", 3, "elo/online/final@3", 1021.1);
    line("elo", 3, "elo_lo/online/final@3", 1004.3);
    line("elo", 3, "elo_hi/online/final@3", 1037.7);
    line("win", 3, "win_rate/online_vs_sft", 0.557);
    line("win", 3, "win_rate_se/online_vs_sft", 0.0217);
    std::fs::write(dir.join("metrics.jsonl"), m).unwrap();
    let out = hone(&workspace(), &["report", dir.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_self_contained(&html);
    let across = &html[html
        .find("<h2>Across rounds</h2>")
        .expect("an across-rounds section")..];
    let across = &across[..across.find("</section>").unwrap()];
    // Gold, length and KL by round (no proxy reward here): three charts,
    // each with the online line only.
    assert_eq!(across.matches("<svg").count(), 3, "{across}");
    assert!(across.contains("online_rewards") && !across.contains("offline_rewards"));
    assert_eq!(across.matches("<circle").count(), 12, "4 rounds x 3 charts");
    assert!(html.contains("1004 .. 1038"), "the Elo interval");
    assert!(html.contains("standard error") && html.contains("0.0217"));
}
