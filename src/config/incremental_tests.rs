use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;

use super::*;
use crate::api::{ApiKeySpec, ApiPlanSpec, BucketScope, ConcurrencySpec, LimitOverrides, RateLimitSpec};
use crate::config::{compile_with_tasks, hash_token, pieces};

const NAMESPACES: [&str; 2] = ["acme", "globex"];

/// One event a watch could deliver.
#[derive(Clone, Debug)]
enum Op {
    /// Plan `p<i>` in one of a few shapes (one of them invalid).
    PutPlan(u8, u8),
    DelPlan(u8),
    /// Key `k<i>` in a namespace: plan `p<plan>` (`p3` is never defined), Secret choice, creation
    /// second, suspended, override.
    PutKey {
        ns: u8,
        i: u8,
        plan: u8,
        secret: u8,
        created: u8,
        suspended: bool,
        slots: Option<u8>,
    },
    DelKey(u8, u8),
    /// Secret `s<i>` (or a key's default `k<i>-token`): entry `token` holds `tok-<v>`, is blank
    /// (`v` 3) or is absent (`v` 4).
    PutSecret(u8, u8, u8),
    DelSecret(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3u8, 0..4u8).prop_map(|(i, v)| Op::PutPlan(i, v)),
        (0..3u8).prop_map(Op::DelPlan),
        (
            0..2u8,
            0..5u8,
            0..4u8,
            0..4u8,
            0..3u8,
            any::<bool>(),
            proptest::option::of(0..3u8)
        )
            .prop_map(|(ns, i, plan, secret, created, suspended, slots)| Op::PutKey {
                ns,
                i,
                plan,
                secret,
                created,
                suspended,
                slots,
            }),
        (0..2u8, 0..5u8).prop_map(|(ns, i)| Op::DelKey(ns, i)),
        (0..2u8, 0..8u8, 0..5u8).prop_map(|(ns, s, v)| Op::PutSecret(ns, s, v)),
        (0..2u8, 0..8u8).prop_map(|(ns, s)| Op::DelSecret(ns, s)),
    ]
}

fn plan(i: u8, shape: u8) -> ApiPlan {
    let slots = |n| ConcurrencySpec {
        max_concurrent_requests: n,
        paths: vec!["/v1/*".into()],
    };
    let rate = |r| RateLimitSpec {
        requests_per_second: r,
        burst: None,
        per: BucketScope::Key,
        paths: vec!["/v1/*".into()],
    };
    let (concurrency, rate_limit) = match shape {
        0 => (Some(slots(2)), None),
        1 => (Some(slots(5)), Some(rate(10))),
        // Invalid: a rate of zero.
        2 => (None, Some(rate(0))),
        _ => (None, None),
    };
    ApiPlan::new(
        &format!("p{i}"),
        ApiPlanSpec {
            display_name: None,
            concurrency,
            rate_limit,
            tasks: None,
            abuse: None,
        },
    )
}

fn secret_name(s: u8) -> String {
    if s < 3 {
        format!("s{s}")
    } else {
        format!("k{}-token", s - 3)
    }
}

fn key(ns: u8, i: u8, plan: u8, secret: u8, created: u8, suspended: bool, slots: Option<u8>) -> ApiKey {
    let mut k = ApiKey::new(
        &format!("k{i}"),
        ApiKeySpec {
            plan: format!("p{plan}"),
            // 3: the default, `k<i>-token`.
            secret_ref: (secret < 3).then(|| SecretKeyRef {
                name: secret_name(secret),
                key: "token".into(),
            }),
            suspended,
            expires_at: None,
            overrides: slots.map(|n| LimitOverrides {
                max_concurrent_requests: Some(u32::from(n)),
                ..Default::default()
            }),
        },
    );
    k.metadata.namespace = Some(NAMESPACES[ns as usize].into());
    k.metadata.creation_timestamp = Some(Time(Timestamp::from_second(i64::from(created)).unwrap()));
    k
}

/// The objects as the API server holds them after the events so far.
#[derive(Default)]
struct World {
    plans: BTreeMap<String, ApiPlan>,
    keys: BTreeMap<String, ApiKey>,
    /// Raw tokens by (namespace, Secret) and entry; blank is "  ".
    secrets: BTreeMap<(String, String), BTreeMap<String, String>>,
}

impl World {
    fn tokens(&self) -> TokenHashes {
        let mut t = TokenHashes::default();
        for ((ns, name), entries) in &self.secrets {
            t.insert_secret(ns, name, entries.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
        }
        t
    }
}

fn hashed(entries: &BTreeMap<String, String>) -> HashMap<String, Option<String>> {
    entries
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (!v.trim().is_empty()).then(|| hash_token(v.as_bytes())),
            )
        })
        .collect()
}

/// Applies `op` to the world and feeds the same event to the index.
fn apply(world: &mut World, index: &mut Incremental, op: &Op) {
    match op.clone() {
        Op::PutPlan(i, shape) => {
            let p = plan(i, shape);
            index.apply_plan(&p);
            world.plans.insert(p.name_any(), p);
        }
        Op::DelPlan(i) => {
            let name = format!("p{i}");
            if world.plans.remove(&name).is_some() {
                index.remove_plan(&name);
            }
        }
        Op::PutKey {
            ns,
            i,
            plan,
            secret,
            created,
            suspended,
            slots,
        } => {
            let k = key(ns, i, plan, secret, created, suspended, slots);
            // The API server keeps an object's creation time across updates.
            let k = match world.keys.get(&k.id()) {
                Some(old) => ApiKey {
                    metadata: old.metadata.clone(),
                    ..k
                },
                None => k,
            };
            index.apply_key(&k);
            world.keys.insert(k.id(), k);
        }
        Op::DelKey(ns, i) => {
            let id = format!("{}/k{i}", NAMESPACES[ns as usize]);
            if world.keys.remove(&id).is_some() {
                index.remove_key(&id);
            }
        }
        Op::PutSecret(ns, s, v) => {
            let id = (NAMESPACES[ns as usize].to_string(), secret_name(s));
            let mut entries = BTreeMap::new();
            match v {
                0..=2 => {
                    entries.insert("token".to_string(), format!("tok-{v}"));
                }
                3 => {
                    entries.insert("token".to_string(), "  ".to_string());
                }
                _ => {
                    entries.insert("other".to_string(), "tok-9".to_string());
                }
            }
            index.apply_secret(&id.0, &id.1, hashed(&entries));
            world.secrets.insert(id, entries);
        }
        Op::DelSecret(ns, s) => {
            let id = (NAMESPACES[ns as usize].to_string(), secret_name(s));
            if world.secrets.remove(&id).is_some() {
                index.remove_secret(&id.0, &id.1);
            }
        }
    }
}

/// After every event (or every few), the index publishes exactly what a full compile of the same
/// objects does, statuses included.
fn check(ops: &[Op], compile_every: usize) -> Result<(), TestCaseError> {
    let mut world = World::default();
    let mut index = Incremental::new(None);
    let mut previous: Option<GatewayConfig> = None;
    for (n, op) in ops.iter().enumerate() {
        apply(&mut world, &mut index, op);
        if (n + 1) % compile_every != 0 && n + 1 != ops.len() {
            continue;
        }
        let plans: Vec<&ApiPlan> = world.plans.values().collect();
        let keys: Vec<&ApiKey> = world.keys.values().collect();
        let full = compile_with_tasks(&plans, &keys, &world.tokens(), BTreeMap::new(), previous.as_ref());
        let changed = index.compile();
        index.refresh_reports();
        prop_assert_eq!(
            changed,
            previous.as_ref().is_none_or(|p| p.version != full.config.version),
            "after {:?}",
            op
        );
        prop_assert_eq!(
            index.pieces("cfg"),
            pieces::split(&full.config, "cfg"),
            "after {:?}",
            op
        );
        prop_assert_eq!(index.keys_digest(), full.keys_digest.as_str());
        prop_assert_eq!(index.plan_reports(), &full.plans);
        let reports: BTreeMap<&str, &KeyReport> = full.keys.iter().map(|(k, v)| (k.as_str(), v)).collect();
        prop_assert_eq!(index.key_reports(), reports, "after {:?}", op);
        prop_assert_eq!(&index.config(), &full.config);
        previous = Some(full.config);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_event_sequence_publishes_what_a_full_compile_does(ops in prop::collection::vec(op(), 1..60)) {
        check(&ops, 1)?;
    }

    #[test]
    fn events_coalesced_between_compiles_publish_what_a_full_compile_does(
        ops in prop::collection::vec(op(), 1..80),
        every in 2..6usize,
    ) {
        check(&ops, every)?;
    }
}

/// Enough keys to need several shards: adding one key rewrites one shard, and growing past a
/// power of two re-cuts them all, as a full compile does.
#[test]
fn many_keys_touch_one_shard_each_and_match_a_full_compile() {
    let mut world = World::default();
    let mut index = Incremental::new(None);
    apply(&mut world, &mut index, &Op::PutPlan(0, 1));
    let p = plan(0, 1);
    let mut tokens = TokenHashes::default();
    let mut keys = Vec::new();
    for i in 0..4100u32 {
        let mut k = ApiKey::new(
            &format!("bulk-{i}"),
            ApiKeySpec {
                plan: "p0".into(),
                ..Default::default()
            },
        );
        k.metadata.namespace = Some("acme".into());
        let hash = hash_token(format!("tok-bulk-{i}").as_bytes());
        tokens.insert_hash("acme", &format!("bulk-{i}-token"), "token", &hash);
        index.apply_secret(
            "acme",
            &format!("bulk-{i}-token"),
            HashMap::from([("token".to_string(), Some(hash))]),
        );
        index.apply_key(&k);
        keys.push(k);
    }
    let full = compile_with_tasks(&[&p], &keys, &tokens, BTreeMap::new(), None);
    assert!(index.compile());
    let before = index.pieces("cfg");
    assert_eq!(before, pieces::split(&full.config, "cfg"));
    assert_eq!(before.len(), 4 + 1, "4,100 keys: four shards and the index");

    // One key rotated: one shard and the index change.
    let hash = hash_token(b"tok-rotated");
    tokens.insert_hash("acme", "bulk-7-token", "token", &hash);
    index.apply_secret(
        "acme",
        "bulk-7-token",
        HashMap::from([("token".to_string(), Some(hash))]),
    );
    let full = compile_with_tasks(&[&p], &keys, &tokens, BTreeMap::new(), Some(&full.config));
    assert!(index.compile());
    let after = index.pieces("cfg");
    assert_eq!(after, pieces::split(&full.config, "cfg"));
    let differ = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(
        differ <= 3,
        "a rotation moves one key between at most two shards; {differ} pieces changed"
    );
    assert_eq!(index.version(), 2);
    assert_eq!(
        index.since("acme/bulk-7"),
        Some(2),
        "the rotated key is enforced as of version 2"
    );
    assert_eq!(index.since("acme/bulk-8"), Some(1), "the others as of version 1");
    assert!(
        index.decided().len() <= 2,
        "one key decided (and an owner of its old token, if any)"
    );

    // A plan upgrade changes the index only.
    index.apply_plan(&plan(0, 0));
    let full = compile_with_tasks(
        &[&plan(0, 0)],
        &keys,
        &tokens,
        BTreeMap::new(),
        Some(&full.config),
    );
    assert!(index.compile());
    let upgraded = index.pieces("cfg");
    assert_eq!(upgraded, pieces::split(&full.config, "cfg"));
    assert_eq!(&upgraded[..4], &after[..4], "no shard changes for a plan upgrade");
    assert!(
        index.decided().is_empty(),
        "a plan upgrade decides no key in compile"
    );
    assert_eq!(
        index.since("acme/bulk-8"),
        Some(3),
        "every key on the plan: enforced as of 3"
    );
    // In chunks, as the controller runs it between changes.
    let mut refreshed = 0;
    while index.refresh_pending() {
        let n = index.refresh_reports_upto(1000);
        assert!(n <= 1000 && index.refreshed().len() == n);
        refreshed += n;
    }
    assert_eq!(refreshed, 4100, "their statuses catch up afterwards");
    let full_reports: BTreeMap<&str, &KeyReport> = full.keys.iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(index.key_reports(), full_reports);
}

/// A new leader continues the version sequence of what it found, and keeps a key whose plan is
/// gone on the limits it was published with.
#[test]
fn a_seeded_index_continues_the_configuration_it_found() {
    let mut world = World::default();
    let mut first = Incremental::new(None);
    for op in [
        Op::PutPlan(0, 1),
        Op::PutSecret(0, 0, 0),
        Op::PutKey {
            ns: 0,
            i: 0,
            plan: 0,
            secret: 0,
            created: 0,
            suspended: false,
            slots: None,
        },
    ] {
        apply(&mut world, &mut first, &op);
    }
    first.compile();
    let found = first.config();

    let mut next = Incremental::new(Some(&found));
    next.apply_key(&world.keys["acme/k0"]);
    next.apply_secret(
        "acme",
        "s0",
        hashed(&world.secrets[&("acme".into(), "s0".into())]),
    );
    // The plan is gone by the time the new leader starts.
    assert!(next.compile(), "the plan is now marked as kept: new content");
    assert_eq!(
        next.version(),
        found.version + 1,
        "the version sequence continues"
    );
    let plans: Vec<&ApiPlan> = Vec::new();
    let keys: Vec<&ApiKey> = world.keys.values().collect();
    let full = compile_with_tasks(&plans, &keys, &world.tokens(), BTreeMap::new(), Some(&found));
    assert_eq!(next.pieces("cfg"), pieces::split(&full.config, "cfg"));
    assert!(next.plans()["p0"].retained, "kept as last known good");
    assert_eq!(next.entry("acme/k0").map(|k| k.plan.as_str()), Some("p0"));

    // The first index, restarted from what the second published, continues from there too.
    let published = next.config();
    let mut restarted = first.restart(Some(&published));
    restarted.remove_plan("p0");
    assert!(
        !restarted.compile(),
        "the same objects: the same content and version"
    );
    assert_eq!(restarted.pieces("cfg"), next.pieces("cfg"));
}
