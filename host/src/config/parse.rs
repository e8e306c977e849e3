//! The KDL document → [`Config`] walk: the entry point and the map of the
//! files that do it.
//!
//! [`walker`] is the generic part: the context that collects problems
//! (they never stop the walk, so one run reports them all), the [`Rule`]
//! tables a block is made of, node shapes and typed value readers. Every
//! other file holds one block's rules: [`top`] the top level and the
//! cross-checks that need the whole file, then `listen`, `store`,
//! `forward`, `mirror`, `site`, `policy`, `limit` (and `limiter`),
//! `timeouts`, `upstream_tls`, `admin` and `server_name`;
//! [`upstream_block`] holds what `mirror` and `site` share. Adding a node
//! kind is one reader function and one table line in its block's file.
//!
//! [`Rule`]: walker::Rule

use std::path::Path;
use std::sync::Arc;

use kdl::KdlDocument;
use miette::NamedSource;

use super::error::{ConfigError, Problem};
use super::model::Config;

mod admin;
mod cluster;
mod forward;
mod health;
mod limit;
mod listen;
mod mirror;
mod policy;
mod server_name;
mod site;
mod store;
mod timeouts;
mod top;
mod upstream_block;
mod upstream_tls;
mod walker;

pub(super) use forward::default_forward;
pub(super) use listen::DEFAULT_LISTEN;
pub(super) use store::default_state;
use top::{TOP_LEVEL, Top};
use walker::{Cx, syntax_problem};

/// Parses and validates `text`, read from `name`. Relative paths resolve
/// against `name`'s directory. With `check_files`, files the config names
/// (CA files, policy modules) must exist.
pub(super) fn parse(text: &str, name: &Path, check_files: bool) -> Result<Config, ConfigError> {
    let invalid = |problems: Vec<Problem>| ConfigError::Invalid {
        src: NamedSource::new(name.display().to_string(), Arc::from(text)).with_language("kdl"),
        problems,
    };
    let doc = match KdlDocument::parse_v2(text) {
        Ok(doc) => doc,
        Err(e) => {
            let mut problems: Vec<Problem> = e
                .diagnostics
                .iter()
                .map(|d| syntax_problem(text, d))
                .collect();
            if problems.is_empty() {
                problems.push(Problem::new(text, (0, 0).into(), "invalid KDL"));
            }
            problems.sort_by_key(|p| p.span.offset());
            return Err(invalid(problems));
        }
    };
    let base = name.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut cx = Cx {
        text,
        base,
        check_files,
        problems: Vec::new(),
    };
    let mut top = Top::default();
    cx.block(&doc, TOP_LEVEL, &mut top);
    let config = top.finish(&mut cx, name);
    if cx.problems.is_empty() {
        Ok(config)
    } else {
        // Cross-checks run after the walk; report in file order regardless.
        cx.problems.sort_by_key(|p| p.span.offset());
        Err(invalid(cx.problems))
    }
}
