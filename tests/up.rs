//! Black-box tests of `slotgate up` and `slotgate load`: the real binary, the example manifests,
//! real HTTP on loopback.

mod common;

use std::{path::Path, process::Command};

use common::*;
use http::StatusCode;

const TRIAL: &str = "sg_demo_trial_7Hq2Lw9XbR4mZs1";
const STARTUP: &str = "sg_demo_startup_Kp3Vn8YcT6dQa5";
const ACME: &str = "sg_demo_acme_Rz5Wm2Jf8Gh4Nc7";

/// A copy of `examples/` the test may edit.
fn examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn up(dir: &Path) -> Proc {
    Proc::up(dir, &[])
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    // Write a new file and rename it over the old one, as editors do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text.replacen(from, to, 1)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn bearer(gw: &Proc, path: &str, key: &str) -> Got {
    let auth = format!("Bearer {key}");
    get(&gw.url(path), &[("authorization", &auth)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_example_keys_with_their_plan_limits() {
    let dir = examples();
    let gw = up(dir.path());
    let out = gw.stdout();
    for expected in [
        "PLANS",
        "startup",
        "default/acme-enterprise",
        "sg_demo_a…",
        "True",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    assert!(!out.contains(ACME), "a raw key was printed:\n{out}");
    for (key, limit) in [(TRIAL, 1), (STARTUP, 25), (ACME, 200)] {
        let r = bearer(&gw, "/v1/monitor/chatgpt", key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.num("x-concurrent-limit"), limit);
        assert_eq!(r.json()["ok"], true, "the demo upstream answers JSON");
        assert_eq!(r.num("x-ratelimit-limit"), 1000);
    }
    // The demo upstream holds a request for delay_ms: the trial's one slot is taken.
    let url = gw.url("/v1/monitor/chatgpt?delay_ms=1000");
    let held = tokio::spawn(async move { get(&url, &[("x-api-key", TRIAL)]).await });
    gw.wait_metric("slotgate_in_flight{plan=\"trial\"}", |v| v == 1.0)
        .await;
    let r = bearer(&gw, "/v1/monitor/chatgpt", TRIAL).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_plan_applies_while_requests_are_in_flight() {
    let dir = examples();
    let gw = up(dir.path());
    let url = gw.url("/v1/monitor/chatgpt?delay_ms=2000");
    let first = tokio::spawn(async move { get(&url, &[("x-api-key", TRIAL)]).await });
    gw.wait_metric("slotgate_in_flight{plan=\"trial\"}", |v| v == 1.0)
        .await;
    assert_eq!(
        bearer(&gw, "/v1/monitor/x", TRIAL).await.code(),
        "concurrency_limit_exceeded"
    );

    edit(
        &dir.path().join("plans.yaml"),
        "maxConcurrentRequests: 1\n",
        "maxConcurrentRequests: 3\n",
    );
    gw.wait_output("plan trial: 1 -> 3 slots, applied in", false)
        .await;
    let more: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url("/v1/monitor/chatgpt?delay_ms=500");
            tokio::spawn(async move { get(&url, &[("x-api-key", TRIAL)]).await })
        })
        .collect();
    for m in more {
        let r = m.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.num("x-concurrent-limit"), 3);
    }
    let r = first.await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the request in flight was failed by the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_keeps_the_old_limits_and_names_file_and_line() {
    let dir = examples();
    let gw = up(dir.path());
    let plans = dir.path().join("plans.yaml");
    edit(
        &plans,
        "maxConcurrentRequests: 25\n",
        "maxConcurrentRequests: -4\n",
    );
    gw.wait_output("keeps serving", true).await;
    let err = gw.stderr();
    assert!(err.contains("plans.yaml:"), "{err}");
    assert!(err.contains("maxConcurrentRequests"), "{err}");
    let r = bearer(&gw, "/v1/monitor/x", STARTUP).await;
    assert_eq!(r.num("x-concurrent-limit"), 25);

    // Fixed again: applied.
    edit(
        &plans,
        "maxConcurrentRequests: -4\n",
        "maxConcurrentRequests: 30\n",
    );
    gw.wait_output("plan startup: 25 -> 30 slots", false).await;
    assert_eq!(
        bearer(&gw, "/v1/monitor/x", STARTUP)
            .await
            .num("x-concurrent-limit"),
        30
    );

    // A key removed from the folder is no longer admitted.
    let keys = dir.path().join("keys.yaml");
    let text = std::fs::read_to_string(&keys).unwrap();
    let kept: Vec<&str> = text
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: trial-demo"))
        .collect();
    std::fs::write(&keys, kept.join("\n---\n")).unwrap();
    gw.wait_output("key default/trial-demo: no longer admitted", false)
        .await;
    assert_eq!(
        bearer(&gw, "/v1/monitor/x", TRIAL).await.code(),
        "invalid_api_key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_lets_requests_in_flight_finish_and_exits_zero() {
    let dir = examples();
    let gw = up(dir.path());
    let url = gw.url("/v1/monitor/chatgpt?delay_ms=700");
    let held = tokio::spawn(async move { get(&url, &[("x-api-key", STARTUP)]).await });
    gw.wait_metric("slotgate_in_flight{plan=\"startup\"}", |v| v == 1.0)
        .await;
    let status = Command::new("kill")
        .args(["-INT", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    let status = gw.exit_status().await;
    assert!(status.success(), "exit status {status:?}");
}

fn load(gw: &Proc, key: &str, extra: &[&str]) -> serde_json::Value {
    let url = gw.url("/v1/monitor/chatgpt?delay_ms=200");
    let mut args = vec!["load", url.as_str(), "--key", key, "--json"];
    args.extend_from_slice(extra);
    let out = Command::new(SLOTGATE).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The summary adds up.
    let refused: u64 = v["refused"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(
        v["total"].as_u64().unwrap(),
        v["succeeded"].as_u64().unwrap() + refused + v["errors"].as_u64().unwrap(),
        "{v}"
    );
    assert!(v["latency_ms"]["p50"].as_f64().unwrap() <= v["latency_ms"]["p99"].as_f64().unwrap());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_twice_the_slots_sees_refusals_unless_adaptive_or_retrying() {
    let dir = examples();
    let gw = up(dir.path());
    // startup: 25 slots; 50 workers.
    let plain = load(&gw, STARTUP, &["-c", "50", "-n", "150"]);
    assert_eq!(plain["total"], 150);
    assert!(
        plain["refused"]["concurrency_limit_exceeded"].as_u64().unwrap() > 0,
        "{plain}"
    );

    let adaptive = load(&gw, STARTUP, &["-c", "50", "-n", "150", "--adaptive"]);
    assert_eq!(adaptive["succeeded"], 150, "{adaptive}");

    let retrying = load(&gw, STARTUP, &["-c", "50", "-n", "150", "--retries", "10"]);
    assert_eq!(retrying["succeeded"], 150, "{retrying}");
    assert!(retrying["retries"].as_u64().unwrap() > 0);

    let both = load(
        &gw,
        STARTUP,
        &["-c", "50", "-n", "100", "--adaptive", "--retries", "3"],
    );
    assert_eq!(both["succeeded"], 100, "{both}");
}

/// The README's quickstart, command by command, as a newcomer types it (ports and the examples
/// folder swapped for a private copy so tests can run in parallel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_works_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Quickstart")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Quickstart section");
    let mut commands: Vec<String> = Vec::new();
    let mut in_sh = false;
    let mut continued = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && !l.is_empty() => {
                let (text, more) = match l.strip_suffix('\\') {
                    Some(t) => (t.trim_end(), true),
                    None => (l, false),
                };
                match commands.last_mut() {
                    Some(last) if continued => {
                        last.push(' ');
                        last.push_str(text);
                    }
                    _ => commands.push(text.to_string()),
                }
                continued = more;
            }
            _ => {}
        }
    }
    // The README shows one task id; the test reads the one its own submission got.
    let shown_id = section
        .split("location: /v1/tasks/")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the quickstart shows a task's location")
        .to_string();
    let mut task_id = None::<String>;
    assert_eq!(
        commands[0], "cargo run --release -- up",
        "the quickstart starts slotgate up"
    );
    let dir = examples();
    let gw = up(dir.path());
    let mut outputs = Vec::new();
    for cmd in &commands[1..] {
        if cmd.starts_with("sed ") {
            let cmd = cmd.replace("examples/", &format!("{}/", dir.path().display()));
            let status = Command::new("sh").args(["-c", &cmd]).status().unwrap();
            assert!(status.success(), "{cmd}");
            gw.wait_output("plan startup: 25 -> 50 slots, applied in", false)
                .await;
            continue;
        }
        let mut cmd = cmd
            .replace("cargo run --release -- ", &format!("{SLOTGATE} "))
            .replace("127.0.0.1:8080", &gw.proxy.to_string());
        let polls_task = cmd.contains(&shown_id);
        if let Some(id) = &task_id {
            cmd = cmd.replace(&shown_id, id);
        }
        // A newcomer reads a task a moment after submitting it; poll until it has run.
        let mut out;
        let mut polls = 0;
        loop {
            let c = cmd.clone();
            out = tokio::task::spawn_blocking(move || Command::new("sh").args(["-c", &c]).output().unwrap())
                .await
                .unwrap();
            polls += 1;
            let done = String::from_utf8_lossy(&out.stdout).contains("\"status\":\"completed\"");
            if !polls_task || done || polls > 100 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(id) = stdout.split("location: /v1/tasks/").nth(1) {
            task_id = id.split_whitespace().next().map(str::to_string);
        }
        outputs.push(stdout);
    }
    assert_eq!(outputs.len(), 7, "{outputs:?}");
    assert!(outputs[4].contains("202 Accepted"), "{}", outputs[4]);
    assert!(task_id.is_some(), "{}", outputs[4]);
    assert!(outputs[5].contains("\"status\":\"completed\""), "{}", outputs[5]);
    assert!(outputs[5].contains("Summarise the seeds"), "{}", outputs[5]);
    assert!(outputs[6].contains("accepted 2000"), "{}", outputs[6]);
    assert!(
        outputs[6].contains("delivered 2000 (completed 2000)  lost 0  duplicates 0  bad signatures 0"),
        "{}",
        outputs[6]
    );
    assert!(outputs[0].contains("x-concurrent-limit: 1"), "{}", outputs[0]);
    assert!(outputs[1].contains("succeeded 100 (100.0%)"), "{}", outputs[1]);
    assert!(
        outputs[2].contains("refused concurrency_limit_exceeded"),
        "{}",
        outputs[2]
    );
    assert!(outputs[3].contains("succeeded 200 (100.0%)"), "{}", outputs[3]);
    assert!(!outputs[3].contains("refused"), "{}", outputs[3]);
}
