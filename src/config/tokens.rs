//! Token hashes: what `compile` knows of tokens. Raw tokens are hashed as they are read and never
//! kept.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// SHA-256 (hex) of a token as clients send it. Surrounding whitespace is not part of a token: a
/// Secret made with `echo token > file` carries a newline the client never sends.
pub fn hash_token(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw.trim_ascii()))
}

/// What a key's Secret holds, as far as `compile` may know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenState<'a> {
    /// No such Secret.
    SecretNotFound,
    /// The Secret exists but the entry is absent or blank.
    Empty,
    /// The token's SHA-256 (hex).
    Hash(&'a str),
}

/// Token hashes of the Secrets keys refer to, by namespace, Secret name and data entry.
#[derive(Clone, Debug, Default)]
pub struct TokenHashes {
    secrets: HashMap<String, HashMap<String, HashMap<String, Option<String>>>>,
}

impl TokenHashes {
    /// Records one Secret, hashing each entry at once; blank entries are remembered as empty.
    pub fn insert_secret<'a>(
        &mut self,
        namespace: &str,
        name: &str,
        entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) {
        let hashed: HashMap<String, Option<String>> = entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), (!v.trim_ascii().is_empty()).then(|| hash_token(v))))
            .collect();
        *self.entries_mut(namespace, name) = hashed;
    }

    /// Records a Secret whose entries are already hashed (hex SHA-256), as a test or a cache has
    /// them.
    pub fn insert_hash(&mut self, namespace: &str, name: &str, entry: &str, hash: &str) {
        self.entries_mut(namespace, name)
            .insert(entry.to_string(), Some(hash.to_string()));
    }

    /// Replaces one Secret's entries with hashes already made (`None`: a blank entry), as an
    /// index fed by watch events keeps them.
    pub fn set_hashes(&mut self, namespace: &str, name: &str, entries: HashMap<String, Option<String>>) {
        *self.entries_mut(namespace, name) = entries;
    }

    /// Every Secret recorded, as `(namespace, name)`.
    pub fn names(&self) -> Vec<(String, String)> {
        self.secrets
            .iter()
            .flat_map(|(ns, names)| names.keys().map(move |n| (ns.clone(), n.clone())))
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

    fn entries_mut(&mut self, namespace: &str, name: &str) -> &mut HashMap<String, Option<String>> {
        self.secrets
            .entry(namespace.to_string())
            .or_default()
            .entry(name.to_string())
            .or_default()
    }

    /// The state of one entry; looked up without allocating, as compile does it once per key.
    pub fn lookup(&self, namespace: &str, name: &str, entry: &str) -> TokenState<'_> {
        match self.secrets.get(namespace).and_then(|names| names.get(name)) {
            None => TokenState::SecretNotFound,
            Some(entries) => match entries.get(entry) {
                Some(Some(hash)) => TokenState::Hash(hash),
                _ => TokenState::Empty,
            },
        }
    }
}
