//! The chat frontend and the dashboard (`static/`), built into the binary; or, with
//! `server.static_dir` set, read from that folder on every request so they can be edited live.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use std::path::{Component, Path, PathBuf};

use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "static/"]
struct Embedded;

/// One file to serve.
pub struct Asset {
    pub body: Cow<'static, [u8]>,
    pub content_type: String,
    /// A strong validator of the content, quoted as HTTP wants it.
    pub etag: String,
}

#[derive(Clone, Debug)]
pub enum Assets {
    Embedded,
    Dir(PathBuf),
}

impl Assets {
    pub fn new(static_dir: &str) -> Assets {
        if static_dir.is_empty() {
            Assets::Embedded
        } else {
            Assets::Dir(PathBuf::from(static_dir))
        }
    }

    /// The file at `path` (relative, `/`-separated), if there is one.
    pub fn get(&self, path: &str) -> Option<Asset> {
        let content_type = match mime_guess::from_path(path).first() {
            Some(guess) => guess.essence_str().to_owned(),
            // Files without an extension are texts: the LICENSE beside a vendored library.
            None if Path::new(path).extension().is_none() => "text/plain".to_owned(),
            None => "application/octet-stream".to_owned(),
        };
        let content_type = match content_type.as_str() {
            t if t.starts_with("text/") || t == "application/javascript" => format!("{t}; charset=utf-8"),
            _ => content_type,
        };
        match self {
            Assets::Embedded => {
                let file = Embedded::get(path)?;
                let hash = file.metadata.sha256_hash();
                let etag =
                    format!("\"{}\"", hash[..12].iter().map(|b| format!("{b:02x}")).collect::<String>());
                Some(Asset { body: file.data, content_type, etag })
            }
            Assets::Dir(root) => {
                // Only plain relative paths: no `..`, no absolute paths, no prefixes.
                let relative = Path::new(path);
                if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
                    return None;
                }
                let body = std::fs::read(root.join(relative)).ok()?;
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                body.hash(&mut hasher);
                let etag = format!("\"{:016x}\"", hasher.finish());
                Some(Asset { body: Cow::Owned(body), content_type, etag })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_files_have_types_and_etags() {
        let index = Assets::Embedded.get("index.html").unwrap();
        assert_eq!(index.content_type, "text/html; charset=utf-8");
        assert!(index.etag.starts_with('"') && index.etag.len() > 10);
        let js = Assets::Embedded.get("app.js").unwrap();
        assert!(js.content_type.contains("javascript"), "{}", js.content_type);
        assert!(Assets::Embedded.get("missing.txt").is_none());
        // Files in subfolders (vendored libraries) are served too, with their types.
        let vendored = Assets::Embedded.get("vendor/uPlot.iife.min.js").unwrap();
        assert!(vendored.content_type.contains("javascript"), "{}", vendored.content_type);
        let css = Assets::Embedded.get("vendor/uPlot.min.css").unwrap();
        assert_eq!(css.content_type, "text/css; charset=utf-8");
        let license = Assets::Embedded.get("vendor/LICENSE").unwrap();
        assert_eq!(license.content_type, "text/plain; charset=utf-8");
    }

    #[test]
    fn a_static_dir_refuses_paths_that_leave_it() {
        let assets = Assets::new(env!("CARGO_MANIFEST_DIR"));
        assert!(assets.get("static/index.html").is_some());
        assert!(assets.get("../etc/passwd").is_none());
        assert!(assets.get("/etc/passwd").is_none());
    }
}
