//! Standalone use without a cluster: a folder of the manifests `kubectl apply` takes, read and
//! compiled the way the controller would.

use std::path::{Path, PathBuf};

use kube::ResourceExt;

use crate::{
    api::{
        ApiKey, ApiPlan,
        manifest::{Manifest, ManifestError, parse_manifests},
    },
    config::{Compiled, GatewayConfig, TokenHashes, compile},
};

/// Everything read from a folder of manifests. Raw tokens are hashed as they are read.
#[derive(Debug, Default)]
pub struct Folder {
    /// ApiPlans found.
    pub plans: Vec<ApiPlan>,
    /// ApiKeys found.
    pub keys: Vec<ApiKey>,
    /// Hashes of the tokens in the Secrets found.
    pub tokens: TokenHashes,
    /// Raw-token prefixes by key id, for display only (`sg_demo_t…`).
    pub token_hints: Vec<(String, String)>,
    /// Objects of other kinds, as `file:line: kind`.
    pub skipped: Vec<String>,
}

impl Folder {
    /// Compiles what was read, as the controller would.
    pub fn compile(&self, previous: Option<&GatewayConfig>) -> Compiled {
        compile(&self.plans, &self.keys, &self.tokens, previous)
    }
}

/// Why a folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The folder or a file in it could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest was refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// The YAML files of a folder (not recursive), sorted, so reading is deterministic.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let io = |source| FolderError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every YAML file of `dir`. Any invalid manifest refuses the whole folder, naming the file
/// and line, so the caller keeps its last good state.
pub fn load_dir(dir: &Path) -> Result<Folder, FolderError> {
    let mut folder = Folder::default();
    for path in yaml_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| FolderError::Io {
            path: path.clone(),
            source,
        })?;
        let label = path.display().to_string();
        for manifest in parse_manifests(&label, &text)? {
            match manifest {
                Manifest::Plan(p) => folder.plans.push(p),
                Manifest::Key(k) => folder.keys.push(k),
                Manifest::Secret(s) => {
                    let ns = s.namespace().unwrap_or_default();
                    let name = s.name_any();
                    let data = s.data.unwrap_or_default();
                    for (entry, bytes) in &data {
                        let hint: String = String::from_utf8_lossy(&bytes.0).trim().chars().take(9).collect();
                        folder
                            .token_hints
                            .push((format!("{ns}/{name}/{entry}"), format!("{hint}…")));
                    }
                    folder.tokens.insert_secret(
                        &ns,
                        &name,
                        data.iter().map(|(k, v)| (k.as_str(), v.0.as_slice())),
                    );
                }
                Manifest::Skipped { kind, line } => {
                    folder.skipped.push(format!("{label}:{line}: {kind}"));
                }
            }
        }
    }
    Ok(folder)
}
