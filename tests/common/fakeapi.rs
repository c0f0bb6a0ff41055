//! An in-memory Kubernetes API server on loopback, for testing the controller and the gateway's
//! Kubernetes source through the real `kube` client: list and watch (with label selectors and
//! resource versions), get, create, replace with resourceVersion conflicts, server-side apply and
//! merge patches (status only through the `/status` subresource), delete with finalizers and
//! owner-reference garbage collection. It can be taken down (every call answers 503 and watches
//! end) and brought back, like an API server restart.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::broadcast};

/// Resources that are cluster-scoped (everything else is namespaced).
const CLUSTER_SCOPED: &[&str] = &["apiplans", "apitasktypes", "apiupstreams", "namespaces"];

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub resource: String,
    pub rv: u64,
    pub kind: &'static str,
    pub object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    /// (resource, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    log: Vec<WatchEvent>,
}

/// A write as the fake saw it, with when it arrived.
#[derive(Clone, Debug)]
pub struct Write {
    pub at: Instant,
    pub method: Method,
    pub path: String,
}

/// One kind of call as RBAC sees it: who made it (the bearer token: `controller` for
/// [`FakeApi::client`], `gateway` for the kubeconfig), the API group, the resource (with
/// `/subresource`), the verb, and the namespace (`None` for a cluster-wide or cluster-scoped call).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub who: String,
    pub group: String,
    pub resource: String,
    pub verb: &'static str,
    pub namespace: Option<String>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<WatchEvent>,
    /// 0, or the status every call answers (503 while down).
    failing: Arc<std::sync::atomic::AtomicU16>,
    /// Watches from a resource version below this answer 410 Gone (history compacted).
    compacted_below: Arc<std::sync::atomic::AtomicU64>,
    pub writes: Arc<Mutex<Vec<Write>>>,
    /// Every kind of call made, for the RBAC check.
    pub calls: Arc<Mutex<std::collections::BTreeSet<Call>>>,
    _dir: Arc<tempfile::TempDir>,
    pub kubeconfig: std::path::PathBuf,
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed());
    *res.status_mut() = StatusCode::from_u16(code).unwrap();
    res.headers_mut()
        .insert("content-type", http::HeaderValue::from_static("application/json"));
    res
}

/// RFC 7386 merge: objects merge recursively, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn label_match(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k.trim_end_matches('=')].as_str() == Some(v),
            None => !labels[term].is_null(),
        })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request path names.
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    api_version: String,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (r, None, None),
        [r, n] => (r, Some(n.to_string()), None),
        [r, n, s] => (r, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(Target {
        resource: resource.to_string(),
        namespace,
        name,
        subresource: sub,
        api_version,
    })
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: slotgate-system\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: gateway\n"
            ),
        )
        .unwrap();
        let api = FakeApi {
            addr,
            state: Arc::default(),
            events: broadcast::channel(1 << 16).0,
            failing: Arc::default(),
            compacted_below: Arc::default(),
            writes: Arc::default(),
            calls: Arc::default(),
            _dir: Arc::new(dir),
            kubeconfig,
        };
        let server = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.serve(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        api
    }

    /// A kube client for this server, as a controller in a test uses it.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.default_namespace = "slotgate-system".into();
        config.auth_info.token = Some("controller".to_string().into());
        slotgate::kube_client(config).unwrap()
    }

    /// Every call answers 503 and open watches end (`true`), or the server is back (`false`).
    pub fn set_down(&self, down: bool) {
        self.set_failing(if down { 503 } else { 0 });
    }

    /// Every call answers `code` (a 401 or 403 while an API server's authentication or
    /// authorization is not ready after a restart) and open watches end; 0: back to normal.
    pub fn set_failing(&self, code: u16) {
        self.failing.store(code, Ordering::SeqCst);
        if code != 0 {
            self.wake_watches();
        }
    }

    /// Compacts the watch history, as etcd does: open watches end, and a watch from any resource
    /// version seen so far answers 410 Gone, so that the client must list again.
    pub fn expire_watches(&self) {
        // A revision of its own, so that a list made now gives a version a watch may start from.
        let rv = {
            let mut st = self.state.lock().unwrap();
            st.rv += 1;
            st.rv
        };
        self.compacted_below.store(rv, Ordering::SeqCst);
        self.wake_watches();
    }

    fn wake_watches(&self) {
        let _ = self.events.send(WatchEvent {
            resource: String::new(),
            rv: 0,
            kind: "NOOP",
            object: Value::Null,
        });
    }

    /// Starts `slotgate gateway` with this API server as its configuration source, watching
    /// `namespace` and reporting as `replica`, in front of `upstream`.
    pub fn start_gateway(&self, namespace: &str, replica: &str, upstream: &str) -> super::Proc {
        self.start_gateway_with(namespace, replica, upstream, &[])
    }

    /// [`FakeApi::start_gateway`] with more arguments (a mounted folder, a task store).
    pub fn start_gateway_with(
        &self,
        namespace: &str,
        replica: &str,
        upstream: &str,
        extra: &[&str],
    ) -> super::Proc {
        let mut source = vec![
            "--config-source",
            "kubernetes",
            "--namespace",
            namespace,
            "--replica-name",
            replica,
        ];
        source.extend_from_slice(extra);
        super::Proc::gateway_from(
            &source,
            upstream,
            &[],
            &[("KUBECONFIG", self.kubeconfig.to_str().unwrap())],
        )
    }

    /// The configuration version a gateway replica reports in its Lease (0 before it reports).
    pub fn reported_version(&self, namespace: &str, replica: &str) -> u64 {
        self.get("leases", namespace, &format!("slotgate-gateway-{replica}"))
            .and_then(|l| {
                l["metadata"]["annotations"]["slotgate.dev/version"]
                    .as_str()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    pub fn list(&self, resource: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates or merges an object directly, as `kubectl apply` would; returns it.
    pub fn apply(&self, resource: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let mut st = self.state.lock().unwrap();
        let key = (resource.to_string(), ns, name);
        let current = st.objects.get(&key).cloned();
        match current {
            None => self.create_locked(&mut st, key, obj),
            Some(mut cur) => {
                let mut body = obj;
                if let Some(o) = body.as_object_mut() {
                    o.remove("status");
                }
                merge(&mut cur, &body);
                self.store_locked(&mut st, key, cur, "MODIFIED")
            }
        }
    }

    /// Deletes as `kubectl delete` would (finalizers respected).
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        self.delete_locked(&mut st, (resource.into(), namespace.into(), name.into()));
    }

    fn create_locked(&self, st: &mut State, key: (String, String, String), mut obj: Value) -> Value {
        st.uid += 1;
        let uid = format!("uid-{}", st.uid);
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("uid".into(), json!(uid));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(k8s_now()));
        if !key.1.is_empty() {
            meta.insert("namespace".into(), json!(key.1));
        }
        self.store_locked(st, key, obj, "ADDED")
    }

    fn store_locked(
        &self,
        st: &mut State,
        key: (String, String, String),
        mut obj: Value,
        kind: &'static str,
    ) -> Value {
        string_data(&mut obj);
        // A deleting object whose last finalizer went is gone.
        if !obj["metadata"]["deletionTimestamp"].is_null()
            && obj["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty())
        {
            st.objects.insert(key.clone(), obj);
            self.remove_locked(st, key);
            return Value::Null;
        }
        if let Some(old) = st.objects.get(&key)
            && old["spec"] != obj["spec"]
        {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            obj["metadata"]["generation"] = json!(g);
        }
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key.clone(), obj.clone());
        let ev = WatchEvent {
            resource: key.0,
            rv: st.rv,
            kind,
            object: obj.clone(),
        };
        st.log.push(ev.clone());
        let _ = self.events.send(ev);
        obj
    }

    fn remove_locked(&self, st: &mut State, key: (String, String, String)) {
        let Some(mut obj) = st.objects.remove(&key) else {
            return;
        };
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let uid = obj["metadata"]["uid"].clone();
        let ev = WatchEvent {
            resource: key.0,
            rv: st.rv,
            kind: "DELETED",
            object: obj,
        };
        st.log.push(ev.clone());
        let _ = self.events.send(ev);
        // Garbage collection: objects owned by the deleted one go too.
        let owned: Vec<_> = st
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            self.delete_locked(st, k);
        }
    }

    fn delete_locked(&self, st: &mut State, key: (String, String, String)) -> Option<Value> {
        let obj = st.objects.get(&key)?.clone();
        if obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                let mut obj = obj;
                obj["metadata"]["deletionTimestamp"] = json!(k8s_now());
                return Some(self.store_locked(st, key, obj, "MODIFIED"));
            }
            return Some(obj);
        }
        self.remove_locked(st, key);
        Some(obj)
    }

    async fn serve(&self, req: Request<Incoming>) -> Response<Body> {
        match self.failing.load(Ordering::SeqCst) {
            0 => {}
            503 => return status(503, "ServiceUnavailable", "the fake API server is down"),
            401 => return status(401, "Unauthorized", "Unauthorized"),
            code => return status(code, "Forbidden", "the fake API server refuses every call"),
        }
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let who = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("anonymous")
            .to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let Some(t) = parse_path(&path) else {
            return status(404, "NotFound", &format!("no route {path}"));
        };
        if method != Method::GET {
            self.writes.lock().unwrap().push(Write {
                at: Instant::now(),
                method: method.clone(),
                path: path.clone(),
            });
        }
        let verb = match (&method, &t.name) {
            (&Method::GET, None) if matches!(query_param(&query, "watch").as_deref(), Some("true" | "1")) => {
                "watch"
            }
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        let call = |verb: &'static str| Call {
            who: who.clone(),
            group: t.api_version.rsplit_once('/').map_or("", |(g, _)| g).to_string(),
            resource: match &t.subresource {
                Some(sub) => format!("{}/{sub}", t.resource),
                None => t.resource.clone(),
            },
            verb,
            namespace: t.namespace.clone(),
        };
        self.calls.lock().unwrap().insert(call(verb));
        let ns = t.namespace.clone().unwrap_or_default();
        let cluster = CLUSTER_SCOPED.contains(&t.resource.as_str());
        match (&method, &t.name) {
            (&Method::GET, None) => {
                if query_param(&query, "watch").as_deref() == Some("true")
                    || query_param(&query, "watch").as_deref() == Some("1")
                {
                    return self.watch(&t, &query);
                }
                let selector = query_param(&query, "labelSelector").unwrap_or_default();
                let st = self.state.lock().unwrap();
                // Pages as the real API server gives them (`limit`, `continue`): the token names
                // the list's resource version and the last object given, and every page carries
                // that version, so a watch from it replays whatever changed during the list.
                let limit: usize = query_param(&query, "limit")
                    .and_then(|l| l.parse().ok())
                    .filter(|&l| l > 0)
                    .unwrap_or(usize::MAX);
                let token = query_param(&query, "continue").filter(|c| !c.is_empty());
                let (list_rv, after) = match token.as_deref().and_then(|c| c.split_once('|')) {
                    Some((rv, key)) => {
                        let (n, name) = key.split_once('/').unwrap_or(("", key));
                        (
                            rv.to_string(),
                            Some((t.resource.clone(), n.to_string(), name.to_string())),
                        )
                    }
                    None => (st.rv.to_string(), None),
                };
                let range = match &after {
                    Some(k) => st
                        .objects
                        .range((std::ops::Bound::Excluded(k.clone()), std::ops::Bound::Unbounded)),
                    None => st.objects.range(..),
                };
                let mut items: Vec<Value> = Vec::new();
                let mut last = None;
                let mut more = false;
                for ((r, n, name), o) in range {
                    if r != &t.resource || !((t.namespace.is_none() || n == &ns) && label_match(o, &selector))
                    {
                        continue;
                    }
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(o.clone());
                    last = Some(format!("{n}/{name}"));
                }
                let mut meta = json!({"resourceVersion": list_rv});
                if more && let Some(last) = last {
                    meta["continue"] = json!(format!("{list_rv}|{last}"));
                }
                json_response(
                    200,
                    &json!({"apiVersion": t.api_version, "kind": "List", "metadata": meta, "items": items}),
                )
            }
            (&Method::GET, Some(name)) => match self.get(&t.resource, if cluster { "" } else { &ns }, name) {
                Some(o) => json_response(200, &o),
                None => status(404, "NotFound", &format!("{} {name} not found", t.resource)),
            },
            (&Method::POST, None) => {
                let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
                    return status(400, "BadRequest", "body is not JSON");
                };
                let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let mut st = self.state.lock().unwrap();
                let key = (
                    t.resource.clone(),
                    if cluster { String::new() } else { ns },
                    name.clone(),
                );
                if st.objects.contains_key(&key) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{} {name} already exists", t.resource),
                    );
                }
                let out = self.create_locked(&mut st, key, obj);
                json_response(201, &out)
            }
            (&Method::PUT, Some(name)) => {
                let Ok(obj) = serde_json::from_slice::<Value>(&body) else {
                    return status(400, "BadRequest", "body is not JSON");
                };
                let mut st = self.state.lock().unwrap();
                let key = (
                    t.resource.clone(),
                    if cluster { String::new() } else { ns },
                    name.clone(),
                );
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(404, "NotFound", "not found");
                };
                if obj["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                let mut obj = obj;
                obj["metadata"]["uid"] = cur["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = cur["metadata"]["creationTimestamp"].clone();
                obj["metadata"]["generation"] = cur["metadata"]["generation"].clone();
                let out = self.store_locked(&mut st, key, obj, "MODIFIED");
                json_response(200, &out)
            }
            (&Method::PATCH, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return status(400, "BadRequest", "body is not JSON");
                };
                let apply = content_type.starts_with("application/apply-patch");
                if apply && query_param(&query, "fieldManager").is_none() {
                    return status(400, "BadRequest", "fieldManager is required for apply patch");
                }
                let mut st = self.state.lock().unwrap();
                let key = (
                    t.resource.clone(),
                    if cluster { String::new() } else { ns },
                    name.clone(),
                );
                let status_only = t.subresource.as_deref() == Some("status");
                match st.objects.get(&key).cloned() {
                    None if apply && !status_only => {
                        // A real API server authorizes an apply that creates as a create as well.
                        self.calls.lock().unwrap().insert(call("create"));
                        let mut obj = patch;
                        obj["metadata"]["name"] = json!(name);
                        let out = self.create_locked(&mut st, key, obj);
                        json_response(201, &out)
                    }
                    None => status(404, "NotFound", &format!("{} {name} not found", t.resource)),
                    Some(mut cur) => {
                        let rv = &patch["metadata"]["resourceVersion"];
                        if !rv.is_null() && !apply && *rv != cur["metadata"]["resourceVersion"] {
                            return status(409, "Conflict", "the object has been modified");
                        }
                        if status_only {
                            let mut s = cur["status"].take();
                            if s.is_null() {
                                s = json!({});
                            }
                            if apply {
                                // Apply of a status owned by one manager: what it sends replaces it.
                                s = patch["status"].clone();
                            } else {
                                merge(&mut s, &patch["status"]);
                            }
                            cur["status"] = s;
                        } else {
                            let mut p = patch;
                            if let Some(o) = p.as_object_mut() {
                                o.remove("status");
                            }
                            if let Some(m) = p["metadata"].as_object_mut() {
                                m.remove("resourceVersion");
                            }
                            merge(&mut cur, &p);
                        }
                        let out = self.store_locked(&mut st, key, cur, "MODIFIED");
                        json_response(200, &out)
                    }
                }
            }
            (&Method::DELETE, Some(name)) => {
                let mut st = self.state.lock().unwrap();
                let key = (
                    t.resource.clone(),
                    if cluster { String::new() } else { ns },
                    name.clone(),
                );
                match self.delete_locked(&mut st, key) {
                    Some(o) => json_response(200, &o),
                    None => status(404, "NotFound", "not found"),
                }
            }
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    fn watch(&self, t: &Target, query: &str) -> Response<Body> {
        let from: u64 = query_param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let timeout = query_param(query, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290u64);
        if from < self.compacted_below.load(Ordering::SeqCst) {
            let gone = WatchEvent {
                resource: t.resource.clone(),
                rv: from,
                kind: "ERROR",
                object: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": format!("too old resource version: {from}"),
                               "reason": "Expired", "code": 410}),
            };
            let mut res = Response::new(BoxBody::new(StreamBody::new(async_stream(
                vec![gone],
                |_| async {},
            ))));
            res.headers_mut()
                .insert("content-type", http::HeaderValue::from_static("application/json"));
            return res;
        }
        let mut rx = self.events.subscribe();
        let resource = t.resource.clone();
        let ns = t.namespace.clone();
        let failing = Arc::clone(&self.failing);
        let compacted = Arc::clone(&self.compacted_below);
        let matches = move |e: &WatchEvent| {
            e.resource == resource
                && ns
                    .as_ref()
                    .is_none_or(|n| e.object["metadata"]["namespace"].as_str() == Some(n))
                && label_match(&e.object, &selector)
        };
        let backlog: Vec<WatchEvent> = {
            let st = self.state.lock().unwrap();
            st.log
                .iter()
                .filter(|e| e.rv > from && matches(e))
                .cloned()
                .collect()
        };
        let stream = async_stream(backlog, move |tx| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    () = tokio::time::sleep_until(deadline) => return,
                };
                if failing.load(Ordering::SeqCst) != 0 || compacted.load(Ordering::SeqCst) > from {
                    return;
                }
                match ev {
                    Ok(e) if e.rv > from && matches(&e) => {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(_) => return,
                }
            }
        });
        let mut res = Response::new(BoxBody::new(StreamBody::new(stream)));
        res.headers_mut()
            .insert("content-type", http::HeaderValue::from_static("application/json"));
        res
    }
}

/// The backlog first (filtered by the same predicate inside `live`'s sender), then live events,
/// each as one JSON line.
fn async_stream<F, Fut>(
    backlog: Vec<WatchEvent>,
    live: F,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<WatchEvent>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<WatchEvent>(1024);
    let (btx, brx) = tokio::sync::mpsc::channel::<WatchEvent>(backlog.len().max(1));
    for e in backlog {
        let _ = btx.try_send(e);
    }
    drop(btx);
    tokio::spawn(live(tx));
    let backlog = tokio_stream_from(brx);
    let live = tokio_stream_from(rx);
    backlog.chain(live).map(|e: WatchEvent| {
        let line = serde_json::to_vec(&json!({"type": e.kind, "object": e.object})).unwrap();
        let mut line = line;
        line.push(b'\n');
        Ok(Frame::data(Bytes::from(line)))
    })
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A Secret's `stringData` is write-only: the API server folds it into `data` (base64).
fn string_data(obj: &mut Value) {
    let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let mut data = Value::Object(obj["data"].as_object().cloned().unwrap_or_default());
    for (k, v) in sd.as_object().into_iter().flatten() {
        data[k] = json!(base64_engine::encode(v.as_str().unwrap_or_default().as_bytes()));
    }
    obj["data"] = data;
}

fn k8s_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

mod base64_engine {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    pub fn encode(b: &[u8]) -> String {
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            out.push(T[(n >> 18) as usize & 63] as char);
            out.push(T[(n >> 12) as usize & 63] as char);
            out.push(if c.len() > 1 {
                T[(n >> 6) as usize & 63] as char
            } else {
                '='
            });
            out.push(if c.len() > 2 {
                T[n as usize & 63] as char
            } else {
                '='
            });
        }
        out
    }
}
