use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{reason::*, *};
use crate::api::{ApiKeySpec, ApiPlanSpec, BucketScope, ConcurrencySpec, LimitOverrides, RateLimitSpec};
use crate::config::hash_token;

fn plan(name: &str, slots: Option<u32>, rps: Option<u32>) -> ApiPlan {
    ApiPlan::new(
        name,
        ApiPlanSpec {
            display_name: Some(name.to_uppercase()),
            concurrency: slots.map(|n| ConcurrencySpec {
                max_concurrent_requests: n,
                paths: vec!["/v1/monitor/*".into()],
            }),
            rate_limit: rps.map(|r| RateLimitSpec {
                requests_per_second: r,
                burst: None,
                per: BucketScope::Endpoint,
                paths: vec!["/v1/*".into()],
            }),
            tasks: None,
            abuse: None,
        },
    )
}

fn key(name: &str, plan: &str, created: i64) -> ApiKey {
    let mut k = ApiKey::new(
        name,
        ApiKeySpec {
            plan: plan.into(),
            ..Default::default()
        },
    );
    k.metadata.namespace = Some("acme".into());
    k.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap()));
    k
}

/// Token store with `<name>-token` Secrets for each key, token `tok-<name>`.
fn tokens_for(keys: &[&str]) -> TokenHashes {
    let mut t = TokenHashes::default();
    for k in keys {
        let raw = format!("tok-{k}");
        t.insert_secret("acme", &format!("{k}-token"), [("token", raw.as_bytes())]);
    }
    t
}

fn condition<'a>(report: &'a KeyReport, type_: &str) -> &'a ConditionSpec {
    report.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn admits_a_key_on_its_plan_with_plan_limits() {
    let out = compile(
        &[plan("startup", Some(25), Some(1000))],
        &[key("a", "startup", 1)],
        &tokens_for(&["a"]),
        None,
    );
    let report = &out.keys["acme/a"];
    assert!(report.admitted);
    assert_eq!(condition(report, READY).reason, ADMITTED);
    assert_eq!(
        report.effective.as_ref().unwrap().max_concurrent_requests,
        Some(25)
    );
    assert_eq!(report.effective.as_ref().unwrap().burst, Some(1000));
    let compiled = &out.config.keys[&hash_token(b"tok-a")];
    assert_eq!(compiled.plan, "startup");
    assert_eq!(out.plans["startup"].keys, 1);
    assert_eq!(out.plans["startup"].conditions[0].reason, COMPILED);
    assert_eq!(out.config.version, 1);
    out.config.check().unwrap();
}

#[test]
fn new_key_on_missing_plan_is_not_admitted() {
    let out = compile::<ApiPlan, _>(&[], &[key("a", "gold", 1)], &tokens_for(&["a"]), None);
    let report = &out.keys["acme/a"];
    assert!(!report.admitted);
    let resolved = condition(report, PLAN_RESOLVED);
    assert!(!resolved.status);
    assert_eq!(resolved.reason, PLAN_NOT_FOUND);
    assert!(
        resolved.message.contains("ApiPlan gold does not exist"),
        "{}",
        resolved.message
    );
    assert_eq!(condition(report, READY).reason, PLAN_NOT_FOUND);
    assert!(out.config.keys.is_empty());
}

#[test]
fn serving_key_on_missing_plan_keeps_last_known_good_limits() {
    let tokens = tokens_for(&["a"]);
    let first = compile(
        &[plan("startup", Some(25), None)],
        &[key("a", "startup", 1)],
        &tokens,
        None,
    );

    // The key moves to a plan that does not exist: it keeps startup's limits.
    let moved = compile(
        &[plan("startup", Some(25), None)],
        &[key("a", "typo", 1)],
        &tokens,
        Some(&first.config),
    );
    let report = &moved.keys["acme/a"];
    assert!(report.admitted);
    assert_eq!(condition(report, PLAN_RESOLVED).reason, PLAN_NOT_FOUND);
    assert!(
        condition(report, READY)
            .message
            .contains("limits of plan startup")
    );
    assert_eq!(moved.config.keys[&hash_token(b"tok-a")].plan, "startup");

    // Its plan is deleted: the plan entry is retained for it.
    let deleted = compile::<ApiPlan, _>(&[], &[key("a", "startup", 1)], &tokens, Some(&first.config));
    assert!(deleted.keys["acme/a"].admitted);
    let retained = &deleted.config.plans["startup"];
    assert!(retained.retained);
    assert_eq!(retained.concurrency.as_ref().unwrap().max, 25);
    assert_eq!(
        deleted.keys["acme/a"]
            .effective
            .as_ref()
            .unwrap()
            .max_concurrent_requests,
        Some(25)
    );
    deleted.config.check().unwrap();
}

#[test]
fn missing_or_blank_secret_refuses_the_key() {
    let mut tokens = TokenHashes::default();
    tokens.insert_secret("acme", "blank-token", [("token", b"  \n".as_slice())]);
    tokens.insert_secret("acme", "wrongentry-token", [("apikey", b"x".as_slice())]);
    let keys = [
        key("nosecret", "p", 1),
        key("blank", "p", 2),
        key("wrongentry", "p", 3),
    ];
    let out = compile(&[plan("p", Some(1), None)], &keys, &tokens, None);

    let r = &out.keys["acme/nosecret"];
    assert!(!r.admitted);
    assert_eq!(condition(r, TOKEN_READY).reason, SECRET_NOT_FOUND);
    assert!(condition(r, TOKEN_READY).message.contains("acme/nosecret-token"));
    assert_eq!(condition(r, READY).reason, SECRET_NOT_FOUND);
    for id in ["acme/blank", "acme/wrongentry"] {
        assert!(!out.keys[id].admitted);
        assert_eq!(condition(&out.keys[id], TOKEN_READY).reason, TOKEN_EMPTY);
    }
    assert!(out.config.keys.is_empty());
}

#[test]
fn duplicate_token_goes_to_the_older_key_whatever_the_order() {
    let mut tokens = TokenHashes::default();
    tokens.insert_secret("acme", "old-token", [("token", b"same".as_slice())]);
    tokens.insert_secret("acme", "new-token", [("token", b"same".as_slice())]);
    for keys in [
        [key("old", "p", 1), key("new", "p", 2)],
        [key("new", "p", 2), key("old", "p", 1)],
    ] {
        let out = compile(&[plan("p", Some(1), None)], &keys, &tokens, None);
        assert!(out.keys["acme/old"].admitted);
        let newer = &out.keys["acme/new"];
        assert!(!newer.admitted);
        let c = condition(newer, TOKEN_READY);
        assert_eq!(c.reason, DUPLICATE_TOKEN);
        assert!(c.message.contains("acme/old"), "{}", c.message);
        assert_eq!(out.config.keys[&hash_token(b"same")].id.as_ref(), "acme/old");
    }
}

#[test]
fn overrides_merge_over_the_plan_field_by_field() {
    let mut k = key("big", "business", 1);
    k.spec.overrides = Some(LimitOverrides {
        max_concurrent_requests: Some(500),
        burst: Some(5000),
        ..Default::default()
    });
    let out = compile(
        &[plan("business", Some(50), Some(1000))],
        &[k],
        &tokens_for(&["big"]),
        None,
    );
    let eff = out.keys["acme/big"].effective.clone().unwrap();
    assert_eq!(eff.max_concurrent_requests, Some(500));
    assert_eq!(eff.requests_per_second, Some(1000), "not overridden: the plan's");
    assert_eq!(eff.burst, Some(5000));
    assert_eq!(eff.per, Some(BucketScope::Endpoint));
    // The override lives on the key; the plan entry stays the plan's.
    assert_eq!(out.config.plans["business"].concurrency.as_ref().unwrap().max, 50);

    // An override of a limit the plan leaves unlimited covers every path.
    let mut k = key("big", "free", 1);
    k.spec.overrides = Some(LimitOverrides {
        requests_per_second: Some(7),
        ..Default::default()
    });
    let out = compile(&[plan("free", None, None)], &[k], &tokens_for(&["big"]), None);
    let limits = out
        .config
        .limits_for(out.config.keys.values().next().unwrap())
        .unwrap();
    let rate = limits.rate.unwrap();
    assert_eq!(
        (rate.per_second, rate.burst, rate.paths),
        (7, 7, vec!["/*".to_string()])
    );
}

#[test]
fn suspended_key_is_compiled_but_not_ready() {
    let mut k = key("s", "p", 1);
    k.spec.suspended = true;
    let out = compile(&[plan("p", Some(3), None)], &[k], &tokens_for(&["s"]), None);
    let r = &out.keys["acme/s"];
    assert!(
        r.admitted,
        "the gateway must know it to answer 403 rather than 401"
    );
    assert!(out.config.keys[&hash_token(b"tok-s")].suspended);
    let ready = condition(r, READY);
    assert!(!ready.status);
    assert_eq!(ready.reason, SUSPENDED);
}

#[test]
fn zero_slots_and_unlimited_plans_say_so() {
    let out = compile(
        &[plan("paused", Some(0), None), plan("free", None, None)],
        &[key("a", "paused", 1), key("b", "free", 2)],
        &tokens_for(&["a", "b"]),
        None,
    );
    assert_eq!(out.plans["paused"].conditions[0].reason, ZERO_CONCURRENCY);
    assert_eq!(condition(&out.keys["acme/a"], READY).reason, ZERO_CONCURRENCY);
    assert_eq!(out.plans["free"].conditions[0].reason, UNLIMITED);
    let eff = out.keys["acme/b"].effective.clone().unwrap();
    assert_eq!(eff, EffectiveLimits::default(), "absent limits are unlimited");
    assert_eq!(condition(&out.keys["acme/b"], READY).reason, ADMITTED);
}

#[test]
fn invalid_plan_is_reported_and_its_keys_not_admitted() {
    let out = compile(
        &[plan("bad", None, Some(0))],
        &[key("a", "bad", 1)],
        &tokens_for(&["a"]),
        None,
    );
    assert_eq!(out.plans["bad"].conditions[0].reason, INVALID_SPEC);
    assert!(!out.keys["acme/a"].admitted);
    assert!(
        condition(&out.keys["acme/a"], PLAN_RESOLVED)
            .message
            .contains("invalid")
    );
}

#[test]
fn deterministic_bytes_and_versions_that_move_only_on_change() {
    let plans = [plan("a", Some(1), Some(5)), plan("b", Some(2), None)];
    let keys = [key("x", "a", 1), key("y", "b", 2), key("z", "a", 3)];
    let tokens = tokens_for(&["x", "y", "z"]);
    let one = compile(&plans, &keys, &tokens, None);
    let mut rev_plans = plans.clone();
    rev_plans.reverse();
    let mut rev_keys = keys.clone();
    rev_keys.reverse();
    let two = compile(&rev_plans, &rev_keys, &tokens, None);
    assert_eq!(
        one.config.to_json(),
        two.config.to_json(),
        "input order does not matter"
    );

    let same = compile(&plans, &keys, &tokens, Some(&one.config));
    assert_eq!(same.config.version, 1, "no change, no new version");
    assert_eq!(same.config.to_json(), one.config.to_json());

    let upgraded = compile(
        &[plan("a", Some(10), Some(5)), plan("b", Some(2), None)],
        &keys,
        &tokens,
        Some(&one.config),
    );
    assert_eq!(upgraded.config.version, 2);
    assert_ne!(upgraded.config.hash, one.config.hash);
    // A plan upgrade touches one plan entry and no key entry.
    assert_eq!(upgraded.config.keys, one.config.keys);
    assert_eq!(upgraded.config.plans["b"], one.config.plans["b"]);
}

#[test]
fn never_outputs_a_raw_token() {
    let raws = ["sg_live_0123456789abcdef", "sg_test_fedcba9876543210"];
    let mut tokens = TokenHashes::default();
    tokens.insert_secret("acme", "a-token", [("token", raws[0].as_bytes())]);
    tokens.insert_secret("acme", "b-token", [("token", raws[0].as_bytes())]); // duplicate
    tokens.insert_secret("acme", "c-token", [("token", raws[1].as_bytes())]);
    let keys = [key("a", "p", 1), key("b", "p", 2), key("c", "missing", 3)];
    let out = compile(&[plan("p", Some(1), Some(1))], &keys, &tokens, None);
    let mut everything = String::from_utf8(out.config.to_json()).unwrap();
    everything.push_str(&serde_json::to_string(&out.keys).unwrap());
    everything.push_str(&serde_json::to_string(&out.plans).unwrap());
    everything.push_str(&format!("{:?}{:?}", out.keys, out.config));
    for raw in raws {
        assert!(!everything.contains(raw), "raw token leaked");
        assert!(!everything.contains(&raw[8..]), "part of a raw token leaked");
    }
    assert!(everything.contains(&hash_token(raws[0].as_bytes())));
}

#[test]
fn a_tampered_or_broken_document_is_refused() {
    let out = compile(
        &[plan("p", Some(1), None)],
        &[key("a", "p", 1)],
        &tokens_for(&["a"]),
        None,
    );
    let good = out.config.to_json();
    assert_eq!(GatewayConfig::from_json(&good).unwrap(), out.config);

    let tampered = String::from_utf8(good.clone())
        .unwrap()
        .replace("\"max\": 1", "\"max\": 100");
    assert!(matches!(
        GatewayConfig::from_json(tampered.as_bytes()),
        Err(crate::config::ConfigError::HashMismatch { .. })
    ));
    let err = GatewayConfig::from_json(b"{\"schema\": 1").unwrap_err();
    assert_eq!(err.metric_label(), "parse");
}

proptest::proptest! {
    /// The plans-only shortcut gives exactly what a full compile gives, whenever it applies, and
    /// applies to every change of limits.
    #[test]
    fn compiling_plans_only_equals_a_full_compile(
        before in proptest::collection::vec((proptest::option::of(0u32..60), proptest::option::of(1u32..2000)), 1..4),
        after in proptest::collection::vec((proptest::option::of(0u32..60), proptest::option::of(0u32..2000)), 1..4),
        on in proptest::collection::vec(0usize..4, 0..12),
    ) {
        let names = ["trial", "startup", "business", "gone"];
        let plans = |limits: &[(Option<u32>, Option<u32>)]| -> Vec<ApiPlan> {
            limits.iter().enumerate().map(|(i, (s, r))| plan(names[i], *s, *r)).collect()
        };
        let key_names: Vec<String> = (0..on.len()).map(|i| format!("k{i}")).collect();
        let keys: Vec<ApiKey> = on.iter().enumerate().map(|(i, p)| key(&key_names[i], names[*p], i as i64)).collect();
        let refs: Vec<&str> = key_names.iter().map(String::as_str).collect();
        let tokens = tokens_for(&refs);
        let first = compile(&plans(&before), &keys, &tokens, None).config;
        let second = plans(&after);
        let full = compile(&second, &keys, &tokens, Some(&first)).config;
        let digest = crate::config::keys_digest(&first.keys);
        match compile_plans_only(&second, &first, &digest) {
            Some(fast) => {
                proptest::prop_assert_eq!(&fast, &full);
                proptest::prop_assert!(std::sync::Arc::ptr_eq(&fast.keys, &first.keys));
            }
            None => {
                // It declines only when the set of valid plans changed.
                let valid: Vec<&String> = full.plans.keys().collect();
                let had: Vec<&String> = first.plans.keys().collect();
                let all_valid = after.iter().all(|(_, r)| *r != Some(0));
                proptest::prop_assert!(
                    before.len() != after.len() || !all_valid || valid != had
                        || first.plans.values().any(|p| p.retained),
                    "declined a change of limits alone"
                );
            }
        }
    }
}

#[test]
fn an_abuse_policy_compiles_with_its_defaults_and_a_bad_one_names_its_field() {
    use crate::api::{AbuseSpec, BanScope};
    let with = |abuse: AbuseSpec| {
        let mut p = plan("p", Some(2), None);
        p.spec.abuse = Some(abuse);
        compile(&[p], &[key("a", "p", 1)], &tokens_for(&["a"]), None)
    };
    let out = with(AbuseSpec {
        refusals: 50,
        by: BanScope::Key,
        ..AbuseSpec::default()
    });
    let policy = out.config.plans["p"].abuse.unwrap();
    assert_eq!(
        (
            policy.refusals,
            policy.window_ms,
            policy.ban_ms,
            policy.max_ban_ms
        ),
        (50, 10_000, 120_000, 3_600_000)
    );
    assert_eq!((policy.escalation_factor, policy.by), (2, BanScope::Key));
    assert!(
        out.plans["p"].conditions[0]
            .message
            .contains("50 refusals in 10000 ms ban the key")
    );

    for (spec, field) in [
        (
            AbuseSpec {
                refusals: 5,
                ban_duration: Some("10m".into()),
                max_ban_duration: Some("5m".into()),
                ..AbuseSpec::default()
            },
            "abuse.maxBanDuration must be at least banDuration",
        ),
        (
            AbuseSpec {
                refusals: 5,
                window: Some("10 seconds".into()),
                ..AbuseSpec::default()
            },
            "abuse.window",
        ),
    ] {
        let out = with(spec);
        assert_eq!(out.plans["p"].conditions[0].reason, INVALID_SPEC);
        assert!(
            out.plans["p"].conditions[0].message.contains(field),
            "{:?}",
            out.plans["p"].conditions
        );
        assert!(!out.keys["acme/a"].admitted);
    }
}

#[test]
fn a_plan_with_tasks_says_so_in_a_condition_of_its_own() {
    let mut with = plan("batch", Some(25), None);
    with.spec.tasks = Some(crate::api::TasksSpec {
        max_concurrent: Some(20),
        ..Default::default()
    });
    let out = compile(
        &[with, plan("plain", Some(5), None)],
        &[] as &[ApiKey],
        &tokens_for(&[]),
        None,
    );
    let tasks = out.plans["batch"]
        .conditions
        .iter()
        .find(|c| c.type_ == TASKS)
        .expect("a Tasks condition");
    assert!(tasks.status);
    assert_eq!(tasks.reason, ENABLED);
    assert!(
        tasks.message.contains("at most 20 of the key's slots"),
        "{}",
        tasks.message
    );
    assert_eq!(out.plans["batch"].conditions[0].type_, READY);
    assert!(!out.plans["plain"].conditions.iter().any(|c| c.type_ == TASKS));
}
