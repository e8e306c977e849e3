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

/// The most `{` a config may hold. The KDL parser (and the walk, and the
/// document's drop) take a stack frame per open block, so a file nested
/// thousands deep would overflow a thread's stack and abort the process,
/// on a reload too; and the parser's time grows with the square of the
/// blocks left open (800 take 5 s). A real config holds a few dozen; a
/// thousand mirrors of three blocks each would still fit.
const MAX_BRACES: usize = 4096;
/// Up to this many `{`, a parse runs on the caller's thread: even an
/// unoptimised build's frames (about 7 KiB a level) fit a 2 MiB stack.
const BRACES_ON_CALLER: usize = 64;
/// Stack reserved per `{` when the parse gets a thread of its own: ten
/// times what a level was seen to take. Only what is used is touched.
const STACK_PER_BRACE: usize = 64 * 1024;
/// The smallest stack of that thread.
const MIN_STACK: usize = 8 * 1024 * 1024;

/// Parses and validates `text`, read from `name`. Relative paths resolve
/// against `name`'s directory. With `check_files`, files the config names
/// (CA files, policy modules) must exist.
pub(super) fn parse(text: &str, name: &Path, check_files: bool) -> Result<Config, ConfigError> {
    // Every open block starts at a `{`, so their count bounds the depth
    // whatever the strings and comments around them.
    let mut count = 0;
    for (at, _) in text.match_indices('{') {
        count += 1;
        if count > MAX_BRACES {
            let problem = Problem::new(
                text,
                (at, 1).into(),
                format!("more than {MAX_BRACES} `{{`: no config nests or holds that many"),
            );
            return Err(invalid(text, name, vec![problem]));
        }
    }
    if count <= BRACES_ON_CALLER {
        return parse_here(text, name, check_files);
    }
    let stack = MIN_STACK.max(count * STACK_PER_BRACE);
    std::thread::scope(|scope| {
        let parser = std::thread::Builder::new()
            .name("cistern-config".into())
            .stack_size(stack)
            .spawn_scoped(scope, || parse_here(text, name, check_files));
        match parser {
            Ok(parser) => parser
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => {
                let why = format!("no thread to parse a config with {count} `{{` on: {e}");
                Err(invalid(
                    text,
                    name,
                    vec![Problem::new(text, (0, 0).into(), why)],
                ))
            }
        }
    })
}

/// [`ConfigError::Invalid`] for `problems` of `text`, read from `name`.
fn invalid(text: &str, name: &Path, problems: Vec<Problem>) -> ConfigError {
    ConfigError::Invalid {
        src: NamedSource::new(name.display().to_string(), Arc::from(text)).with_language("kdl"),
        problems,
    }
}

/// [`parse`] on this thread's stack.
fn parse_here(text: &str, name: &Path, check_files: bool) -> Result<Config, ConfigError> {
    let invalid = |problems: Vec<Problem>| invalid(text, name, problems);
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
