//! `store-id`: many mirror URLs → one cache key, like Squid's store-id.
//!
//! Each `param "rule" "PATTERN KEY"` maps request URLs to a cache key. The
//! pattern is matched against the whole absolute URL; `*` matches any run of
//! characters (possibly empty) and the key refers to what the n-th `*`
//! matched as `$n` (`$1`…`$9`); each `*` takes the shortest run that lets
//! the rest match. Rules are tried in file order; the first match sets the
//! key, and a URL no rule matches keeps its own. Matching takes time linear
//! in the URL however many `*` a rule has (see `glob`). The host keeps
//! each URL's key (ABI §18, `reuse_outcome`), so a hot URL costs no call.
//!
//! ```kdl
//! policy "store-id" path="builtin:store-id" {
//!     param "rule" "http://*/debian/pool/* http://debian.cistern/pool/$2"
//! }
//! ```

mod glob;

use std::sync::OnceLock;
use std::time::Duration;

use cistern_guest::{self as cistern, Level, Result, request};
use glob::glob;

/// The rules as (pattern, key template), read and split at the first call
/// of each instance: an instance's parameters never change (a reload makes
/// new instances), and reading them is two host calls and three
/// allocations per request otherwise.
static RULES: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// How long the host may reuse a URL's key: as long as it likes.
const KEEP: Duration = Duration::from_secs(365 * 86_400);

fn rules() -> Result<&'static [(String, String)]> {
    if let Some(rules) = RULES.get() {
        return Ok(rules);
    }
    let mut rules = Vec::new();
    for rule in cistern::params("rule")? {
        match rule.split_once(char::is_whitespace) {
            Some((pattern, template)) => {
                rules.push((pattern.to_owned(), template.trim().to_owned()));
            }
            None => cistern::log(Level::Warn, &format!("rule {rule:?} has no key template")),
        }
    }
    Ok(RULES.get_or_init(|| rules))
}

fn expand(template: &str, captures: &[&str]) -> String {
    let mut key = String::with_capacity(template.len() + 32);
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$'
            && let Some(d) = chars.peek().and_then(|d| d.to_digit(10))
        {
            chars.next();
            if let Some(capture) = (d as usize).checked_sub(1).and_then(|i| captures.get(i)) {
                key.push_str(capture);
            }
            continue;
        }
        key.push(c);
    }
    key
}

fn on_request() -> Result<()> {
    let url = request::url()?;
    // The key is a function of the URL and the rules alone: the host may
    // apply it to the next request for this URL without calling again.
    // Rules change only with a reload, which forgets every kept outcome.
    request::reuse_outcome(KEEP)?;
    let mut captures = Vec::new();
    for (pattern, template) in rules()? {
        if glob(pattern, &url, &mut captures) {
            return request::set_cache_key(&expand(template, &captures));
        }
    }
    Ok(())
}

cistern::policy!(on_request => on_request);
