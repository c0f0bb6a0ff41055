//! Token hashes: what `compile` knows of tokens. Raw tokens are hashed as they are read and never
//! kept.

use std::{collections::HashMap, sync::Arc};

use sha2::{Digest, Sha256};

/// SHA-256 (hex) of a token as clients send it. Surrounding whitespace is not part of a token: a
/// Secret made with `echo token > file` carries a newline the client never sends.
pub fn hash_token(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw.trim_ascii()))
}

/// A token's SHA-256 (hex), allocated once and shared by whoever names it (the token's Secret,
/// the key that claims it, its configuration entry).
pub type TokenDigest = Arc<str>;

/// What a key's Secret holds, as far as `compile` may know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState<'a> {
    /// No such Secret.
    SecretNotFound,
    /// The Secret exists but the entry is absent or blank.
    Empty,
    /// The token's SHA-256 (hex).
    Hash(&'a TokenDigest),
}

/// Token hashes of the Secrets keys refer to, by namespace, Secret name and data entry.
#[derive(Clone, Debug, Default)]
pub struct TokenHashes {
    /// By namespace and name; each Secret's entries in a small vector (a Secret has one or two,
    /// and a map of its own cost a few hundred bytes per Secret at 100,000 of them).
    secrets: HashMap<Box<str>, HashMap<Box<str>, Entries>>,
}

/// One Secret's entries: the entry name and its token digest (`None`: blank), the first inline.
type Entries = smallvec::SmallVec<[(Arc<str>, Option<TokenDigest>); 1]>;

/// An entry name as one allocation shared by every Secret: nearly all of them name theirs
/// `token`.
fn entry_name(entry: &str) -> Arc<str> {
    static NAMES: std::sync::Mutex<Vec<Arc<str>>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| &***n == entry) {
        return Arc::clone(n);
    }
    let n: Arc<str> = entry.into();
    // Bounded: entry names are whatever the Secrets' authors chose.
    if names.len() < 64 {
        names.push(Arc::clone(&n));
    }
    n
}

impl TokenHashes {
    /// Records one Secret, hashing each entry at once; blank entries are remembered as empty.
    pub fn insert_secret<'a>(
        &mut self,
        namespace: &str,
        name: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) {
        let hashed: Entries = entries
            .into_iter()
            .map(|(k, v)| {
                let digest = (!v.trim_ascii().is_empty()).then(|| hash_token(v).into());
                (entry_name(k), digest)
            })
            .collect();
        *self.entries_mut(namespace, name) = hashed;
    }

    /// Records a Secret whose entries are already hashed (hex SHA-256), as a test or a cache has
    /// them.
    pub fn insert_hash(&mut self, namespace: &str, name: &str, entry: &str, hash: &str) {
        let entries = self.entries_mut(namespace, name);
        entries.retain(|(e, _)| &**e != entry);
        entries.push((entry_name(entry), Some(hash.into())));
    }

    /// Replaces one Secret's entries with hashes already made (`None`: a blank entry), as an
    /// index fed by watch events keeps them.
    pub fn set_hashes(&mut self, namespace: &str, name: &str, entries: HashMap<String, Option<String>>) {
        *self.entries_mut(namespace, name) = entries
            .into_iter()
            .map(|(k, v)| (entry_name(&k), v.map(Into::into)))
            .collect();
    }

    /// Every Secret recorded, as `(namespace, name)`.
    pub fn names(&self) -> Vec<(String, String)> {
        self.secrets
            .iter()
            .flat_map(|(ns, names)| names.keys().map(move |n| (ns.to_string(), n.to_string())))
            .collect()
    }

    /// Forgets one Secret.
    pub fn remove_secret(&mut self, namespace: &str, name: &str) {
        if let Some(names) = self.secrets.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                self.secrets.remove(namespace);
            }
        }
    }

    fn entries_mut(&mut self, namespace: &str, name: &str) -> &mut Entries {
        self.secrets
            .entry(namespace.into())
            .or_default()
            .entry(name.into())
            .or_default()
    }

    /// The state of one entry; looked up without allocating, as compile does it once per key.
    pub fn lookup(&self, namespace: &str, name: &str, entry: &str) -> TokenState<'_> {
        match self.secrets.get(namespace).and_then(|names| names.get(name)) {
            None => TokenState::SecretNotFound,
            Some(entries) => match entries.iter().find(|(e, _)| &**e == entry) {
                Some((_, Some(hash))) => TokenState::Hash(hash),
                _ => TokenState::Empty,
            },
        }
    }
}
