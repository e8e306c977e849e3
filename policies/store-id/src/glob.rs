//! `*` patterns matched in time linear in the text, whatever the number
//! of stars.
//!
//! Backtracking over every split of the text between the stars costs a
//! number of steps that grows like the text's length to the power of the
//! stars, and a crafted URL against a rule with a few of them runs until the
//! deadline. None of that search is needed: a pattern is a prefix, literal
//! pieces separated by `*`, and a suffix. The prefix and the suffix are
//! pinned to the ends of the text; each piece in between is taken at its
//! first occurrence after the previous one. Taking a piece as early as
//! possible never loses a match (the next `*` absorbs the gap), so the
//! first occurrences match exactly when some split does, and they give
//! each `*` the shortest run that lets the rest match, in order: the
//! captures the backtracking search returned (`http://*/pool/*` splits at
//! the first `/pool/`). Each search starts where the last one ended, so the
//! whole match reads the text about once.

/// Matches `text` against `pattern`, where `*` matches any run of
/// characters (possibly empty); on a match, `captures` holds what each
/// `*` matched, in order.
pub fn glob<'t>(pattern: &str, text: &'t str, captures: &mut Vec<&'t str>) -> bool {
    captures.clear();
    let Some((prefix, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let (pieces, suffix) = rest.rsplit_once('*').unwrap_or(("", rest));
    let Some(middle) = text
        .strip_prefix(prefix)
        .and_then(|t| t.strip_suffix(suffix))
    else {
        return false;
    };
    let mut at = 0;
    // With one `*`, `pieces` is empty and there is nothing to place.
    if rest.contains('*') {
        for piece in pieces.split('*') {
            let Some(found) = middle[at..].find(piece) else {
                return false;
            };
            captures.push(&middle[at..at + found]);
            at += found + piece.len();
        }
    }
    captures.push(&middle[at..]);
    true
}
