//! Server-rendered HTML pages of the admin UI. Plain HTML and one small
//! stylesheet; the only script (`static/cistern.js`) refreshes the download
//! progress bars from `/api/downloads` and the pages work without it.

use std::fmt::Write as _;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::api::{Download, FileEntry, FleetView, Listing, Mirror, Policy, Redirects, Status};
use crate::config::units::format_size as bytes;
use crate::store::meta::from_unix_secs;

/// The stylesheet, served at `/static/cistern.css`.
pub const CSS: &str = include_str!("static/cistern.css");
/// The script, served at `/static/cistern.js`.
pub const JS: &str = include_str!("static/cistern.js");

/// Characters left as they are in a query parameter value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Escapes text for HTML element content and quoted attribute values.
pub use crate::body::html_escape as esc;

/// Seconds → `42 s`, `5 min`, `3 h`, `12 d`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s if s < 2 * 86400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86400),
    }
}

fn replica_link(path: &str) -> String {
    format!("/replica?path={}", utf8_percent_encode(path, QUERY_VALUE))
}

fn page(title: &str, current: &str, body: &str) -> String {
    let nav = [
        ("/", "Overview"),
        ("/replica", "Replica"),
        ("/fleet", "Fleet"),
        ("/metrics", "Metrics"),
        ("/api/status", "JSON"),
    ];
    let mut links = String::new();
    for (href, label) in nav {
        let class = if href == current {
            " class=\"current\""
        } else {
            ""
        };
        let _ = write!(links, "<a href=\"{href}\"{class}>{label}</a>");
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · Cistern</title>\n<link rel=\"stylesheet\" href=\"/static/cistern.css\">\n\
         <script src=\"/static/cistern.js\" defer></script>\n</head>\n<body>\n\
         <header><span class=\"brand\">Cistern</span><nav>{links}</nav></header>\n<main>\n{body}</main>\n</body>\n</html>\n",
        title = esc(title),
    )
}

/// `part` of `whole` as a percentage, 0 for an empty whole.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// `/fleet`: the nodes of the fleet (`cluster`), their health, the share
/// of keys each owns and this node's peer bytes beside its upstream bytes.
pub fn fleet(view: Option<&FleetView>) -> String {
    let mut b = String::from("<section id=\"fleet\"><h2>Fleet</h2>\n");
    let Some(v) = view else {
        b.push_str(
            "<p class=\"muted\">This Cistern is not in a fleet (no <code>cluster</code> block in config.kdl).</p>\n</section>\n",
        );
        return page("Fleet", "/fleet", &b);
    };
    let _ = writeln!(
        b,
        "<p>This node: <strong id=\"this-node\">{}</strong>. Shares count the owner of each of the \
         {} keys in this node's replica by the rendezvous hash.</p>",
        esc(&v.node),
        v.sampled_keys
    );
    b.push_str(
        "<table id=\"nodes\"><thead><tr><th>Node</th><th>URL</th><th>State</th>\
         <th class=\"num\">Share of keys</th><th class=\"num\">Keys</th><th class=\"num\">Asked</th>\
         <th class=\"num\">Failures</th><th>Last error</th></tr></thead><tbody>\n",
    );
    for n in &v.nodes {
        let (state, name) = match (n.this_node, n.down) {
            (true, _) => (
                "up",
                format!("{} <span class=\"badge\">this node</span>", esc(&n.name)),
            ),
            (false, true) => ("down", esc(&n.name)),
            (false, false) => ("up", esc(&n.name)),
        };
        let _ = writeln!(
            b,
            "<tr class=\"node\" data-node=\"{id}\"><td>{name}</td><td><code>{url}</code></td>\
             <td><span class=\"badge {state}\">{state}</span></td><td class=\"num\">{share:.0} %</td>\
             <td class=\"num\">{keys}</td><td class=\"num\">{asked}</td><td class=\"num\">{failed}</td>\
             <td class=\"muted\">{err}</td></tr>",
            id = esc(&n.name),
            url = esc(n.url.as_deref().unwrap_or("")),
            share = percent(n.owned_keys, v.sampled_keys),
            keys = n.owned_keys,
            asked = n.asked,
            failed = n.failed,
            err = esc(n.last_error.as_deref().unwrap_or("")),
        );
    }
    b.push_str("</tbody></table>\n");
    let total = v.peer_bytes + v.upstream_bytes;
    let _ = writeln!(
        b,
        "<h3>Where this node's fills came from</h3>\n<table id=\"fill-bytes\"><thead><tr><th>Source</th>\
         <th class=\"num\">Bytes</th><th class=\"num\">Share</th></tr></thead><tbody>\n\
         <tr><td>Peers</td><td class=\"num\" id=\"peer-bytes\" data-bytes=\"{pb}\">{pbs}</td><td class=\"num\">{pp:.0} %</td></tr>\n\
         <tr><td>Upstreams</td><td class=\"num\" id=\"upstream-bytes\" data-bytes=\"{ub}\">{ubs}</td><td class=\"num\">{up:.0} %</td></tr>\n\
         </tbody></table>",
        pb = v.peer_bytes,
        pbs = bytes(v.peer_bytes),
        pp = percent(v.peer_bytes, total),
        ub = v.upstream_bytes,
        ubs = bytes(v.upstream_bytes),
        up = percent(v.upstream_bytes, total),
    );
    b.push_str("</section>\n");
    page("Fleet", "/fleet", &b)
}

fn progress_cell(written: u64, length: Option<u64>) -> String {
    match length {
        Some(total) => {
            let pct = if total == 0 {
                100.0
            } else {
                written as f64 * 100.0 / total as f64
            };
            format!(
                "<progress value=\"{written}\" max=\"{total}\">{pct:.0}%</progress> \
                 <span class=\"progress-text\">{} of {} ({pct:.0}%)</span>",
                bytes(written),
                bytes(total)
            )
        }
        None => format!(
            "<progress></progress> <span class=\"progress-text\">{} (length unknown)</span>",
            bytes(written)
        ),
    }
}

fn download_row(d: &Download) -> String {
    let name = d.path.as_deref().unwrap_or(&d.key);
    format!(
        "<tr class=\"download\" data-key=\"{key}\"><td class=\"name\" title=\"{key}\">{name}</td>\
         <td class=\"state\">{state}</td><td class=\"progress\">{progress}</td>\
         <td class=\"num rate\">{rate}/s</td><td class=\"num readers\">{readers}</td><td class=\"num\">{elapsed}</td></tr>\n",
        key = esc(&d.key),
        name = esc(name),
        state = d.state,
        progress = progress_cell(d.written, d.length),
        rate = bytes(d.rate_bytes_per_sec as u64),
        readers = d.readers,
        elapsed = age(d.elapsed_secs as u64),
    )
}

/// The downloads table (also the shape `cistern.js` rebuilds).
fn downloads_table(downloads: &[Download]) -> String {
    let mut rows = String::new();
    for d in downloads {
        rows.push_str(&download_row(d));
    }
    if downloads.is_empty() {
        rows.push_str(
            "<tr class=\"empty\"><td colspan=\"6\">No downloads in progress.</td></tr>\n",
        );
    }
    format!(
        "<table id=\"downloads\"><thead><tr><th>File</th><th>State</th><th>Progress</th>\
         <th class=\"num\">Rate</th><th class=\"num\">Readers</th><th class=\"num\">Elapsed</th></tr></thead>\n\
         <tbody id=\"downloads-body\">\n{rows}</tbody></table>\n"
    )
}

/// `/`: status, downloads, mirrors, policies, redirects.
pub fn overview(
    status: &Status,
    downloads: &[Download],
    mirrors: &[Mirror],
    policies: &[Policy],
    redirects: &Redirects,
) -> String {
    let mut b = String::new();
    b.push_str("<section id=\"status\"><h2>Status</h2>\n");
    if let Some(err) = &status.last_reload_error {
        let _ = writeln!(
            b,
            "<div class=\"error\" id=\"reload-error\"><strong>The last config reload was refused</strong> \
             (the previous config keeps serving):<pre>{}</pre></div>",
            esc(err)
        );
    }
    let reloaded = httpdate::fmt_http_date(from_unix_secs(status.last_reload_at));
    let source = status
        .config_source
        .as_deref()
        .unwrap_or("built-in defaults");
    let hits = status
        .counters
        .requests
        .iter()
        .find(|(o, _)| *o == "hit")
        .map_or(0, |(_, n)| *n);
    let total: u64 = status.counters.requests.iter().map(|(_, n)| n).sum();
    let _ = write!(
        b,
        "<dl class=\"facts\">\
         <dt>Config generation</dt><dd id=\"config-generation\">{gen}</dd>\
         <dt>Last reload</dt><dd id=\"last-reload\">{reload_state} · {reloaded}</dd>\
         <dt>Config file</dt><dd><code>{source}</code></dd>\
         <dt>Mode</dt><dd>{mode}</dd>\
         <dt>Replica</dt><dd><a href=\"/replica\">{files} files, {size}</a> in <code>{root}</code></dd>\
         <dt>Requests</dt><dd>{total} · from the replica: {hits} · coalesced: {coalesced}</dd>\
         <dt>Sent to clients</dt><dd>{sent}</dd>\
         <dt>From upstreams</dt><dd>{fetched} in {fills} fills ({fills_failed} failed)</dd>\
         <dt>Uptime</dt><dd>{uptime} · version {version}</dd></dl>\n</section>\n",
        gen = status.config_generation,
        reload_state = if status.last_reload_error.is_some() {
            "refused"
        } else {
            "ok"
        },
        reloaded = esc(&reloaded),
        source = esc(source),
        mode = status.mode,
        files = status.replica_files,
        size = bytes(status.replica_bytes),
        root = esc(&status.replica_root),
        coalesced = status.counters.coalesced_followers,
        sent = bytes(status.counters.client_bytes),
        fetched = bytes(status.counters.upstream_bytes),
        fills = status.counters.fills,
        fills_failed = status.counters.fills_failed,
        uptime = age(status.uptime_secs),
        version = status.version,
    );

    let _ = write!(
        b,
        "<section id=\"downloads-section\"><h2>Downloads in progress <span class=\"count\" id=\"downloads-count\">{}</span></h2>\n{}</section>\n",
        downloads.len(),
        downloads_table(downloads)
    );

    b.push_str("<section id=\"mirrors\"><h2>Mirrors</h2>\n");
    if mirrors.is_empty() {
        b.push_str("<p class=\"muted\">No mirror is configured.</p>\n");
    } else {
        b.push_str(
            "<table><thead><tr><th>Mirror</th><th>Prefix</th><th>Upstream</th><th>State</th>\
             <th class=\"num\">Weight</th><th class=\"num\">Share</th><th class=\"num\">Latency</th>\
             <th class=\"num\">Requests</th><th class=\"num\">Failures</th><th>Last error</th>\
             <th>Last probe</th></tr></thead><tbody>\n",
        );
        for m in mirrors {
            for (i, u) in m.upstreams.iter().enumerate() {
                let (name, prefix) = if i == 0 && m.mode == "redirect" {
                    (
                        format!("{} <span class=\"badge\">redirect</span>", esc(&m.name)),
                        esc(&m.prefix),
                    )
                } else if i == 0 {
                    (esc(&m.name), esc(&m.prefix))
                } else {
                    (String::new(), String::new())
                };
                let latency = u
                    .latency_ms
                    .map_or_else(String::new, |l| format!("{l:.1} ms"));
                let probe = u.last_probe.as_ref().map_or_else(String::new, |p| {
                    format!(
                        "{} {} ({:.1} ms)",
                        if p.ok { "ok" } else { "failed:" },
                        esc(&p.detail),
                        p.took_ms
                    )
                });
                let _ = writeln!(
                    b,
                    "<tr><td>{name}</td><td><code>{prefix}</code></td><td><code>{base}</code></td>\
                     <td><span class=\"badge {state}\">{state}</span></td><td class=\"num\">{weight}</td>\
                     <td class=\"num\">{share:.0} %</td><td class=\"num\">{latency}</td>\
                     <td class=\"num\">{fetches}</td><td class=\"num\">{failures}</td>\
                     <td class=\"muted\">{err}</td><td class=\"muted\">{probe}</td></tr>",
                    base = esc(&u.base),
                    state = u.state,
                    weight = u.weight,
                    share = u.share * 100.0,
                    fetches = u.fetches,
                    failures = u.failures,
                    err = esc(u.last_error.as_deref().unwrap_or("")),
                );
            }
        }
        b.push_str("</tbody></table>\n");
    }
    b.push_str("</section>\n");

    b.push_str("<section id=\"policies\"><h2>Policies</h2>\n");
    if policies.is_empty() {
        b.push_str("<p class=\"muted\">No policy is declared.</p>\n");
    } else {
        b.push_str(
            "<table><thead><tr><th>Policy</th><th class=\"num\">Calls</th><th class=\"num\">Traps</th>\
             <th class=\"num\">Timeouts</th><th class=\"num\">Memory limit</th><th class=\"num\">Guest errors</th>\
             <th class=\"num\">Reused</th><th class=\"num\">Mean</th><th class=\"num\">Max</th></tr></thead><tbody>\n",
        );
        for p in policies {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1} µs</td><td class=\"num\">{:.1} µs</td></tr>",
                esc(&p.name),
                p.calls,
                p.traps,
                p.timeouts,
                p.memory_limits,
                p.guest_errors,
                p.reused,
                p.mean_secs * 1e6,
                p.max_secs * 1e6,
            );
        }
        b.push_str("</tbody></table>\n");
    }
    b.push_str("</section>\n");
    redirects_section(&mut b, redirects);
    page("Overview", "/", &b)
}

/// How many files of a day the overview lists per mirror (the JSON API
/// has them all).
const REDIRECT_FILES_SHOWN: usize = 20;

/// Today's redirect counters (redirect-mode mirrors only).
fn redirects_section(b: &mut String, redirects: &Redirects) {
    let Some(today) = redirects.days.first() else {
        return;
    };
    let _ = writeln!(
        b,
        "<section id=\"redirects\"><h2>Redirects on {}</h2>",
        esc(&today.date)
    );
    for m in &today.mirrors {
        let _ = writeln!(
            b,
            "<h3>{} <span class=\"count\">{}</span></h3>\n<table><thead><tr><th>Upstream</th>\
             <th class=\"num\">Redirects</th></tr></thead><tbody>",
            esc(&m.mirror),
            m.redirects
        );
        for u in &m.upstreams {
            let _ = writeln!(
                b,
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td></tr>",
                esc(&u.upstream),
                u.redirects
            );
        }
        b.push_str(
            "</tbody></table>\n<table><thead><tr><th>File</th><th class=\"num\">Redirects</th>\
                    <th>Per upstream</th></tr></thead><tbody>\n",
        );
        for f in m.files.iter().take(REDIRECT_FILES_SHOWN) {
            let per: Vec<String> = f
                .upstreams
                .iter()
                .map(|u| format!("{} {}", esc(&u.upstream), u.redirects))
                .collect();
            let _ = writeln!(
                b,
                "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"muted\">{}</td></tr>",
                esc(&f.file),
                f.redirects,
                per.join(" · ")
            );
        }
        if m.other_files > 0 {
            let _ = writeln!(
                b,
                "<tr><td class=\"muted\">other files (not tracked)</td><td class=\"num\">{}</td><td></td></tr>",
                m.other_files
            );
        }
        b.push_str("</tbody></table>\n");
    }
    b.push_str("</section>\n");
}

fn file_row(f: &FileEntry) -> String {
    let title = esc(f.url.as_deref().unwrap_or(&f.key));
    match f.state {
        "partial" => format!(
            "<tr class=\"file partial\"><td class=\"name\" title=\"{title}\">{name}</td>\
             <td><span class=\"badge partial\">partial</span></td><td colspan=\"4\" class=\"progress\">{progress}</td></tr>\n",
            name = esc(&f.name),
            progress = progress_cell(f.size, f.length),
        ),
        _ => format!(
            "<tr class=\"file complete\"><td class=\"name\" title=\"{title}\">{name}</td>\
             <td><span class=\"badge complete\">complete</span></td><td class=\"num size\">{size}</td>\
             <td class=\"num age\">{age}</td><td class=\"num hits\">{hits}</td><td><code class=\"sha256\">{sha}</code></td></tr>\n",
            name = esc(&f.name),
            size = bytes(f.size),
            age = f.age_secs.map(age).unwrap_or_default(),
            hits = f.hits.unwrap_or(0),
            sha = esc(f.sha256.as_deref().unwrap_or("")),
        ),
    }
}

/// `/replica?path=DIR`: one directory of the replica tree.
pub fn replica(l: &Listing) -> String {
    let mut b = String::new();
    // Breadcrumb: replica / host:port / dir / …
    b.push_str("<nav class=\"crumbs\" id=\"crumbs\"><a href=\"/replica\">replica</a>");
    let mut so_far = String::new();
    for part in l.path.split('/').filter(|p| !p.is_empty()) {
        if !so_far.is_empty() {
            so_far.push('/');
        }
        so_far.push_str(part);
        let _ = write!(
            b,
            " / <a href=\"{}\">{}</a>",
            esc(&replica_link(&so_far)),
            esc(part)
        );
    }
    b.push_str("</nav>\n");
    b.push_str(
        "<table id=\"tree\"><thead><tr><th>Name</th><th>State</th><th class=\"num\">Size</th>\
         <th class=\"num\">Age</th><th class=\"num\">Hits</th><th>SHA-256</th></tr></thead><tbody>\n",
    );
    if let Some(parent) = &l.parent {
        let _ = writeln!(
            b,
            "<tr class=\"dir up\"><td class=\"name\"><a href=\"{}\">..</a></td><td colspan=\"5\"></td></tr>",
            esc(&replica_link(parent))
        );
    }
    for d in &l.dirs {
        let partial = if d.partial > 0 {
            format!(" · {} downloading", d.partial)
        } else {
            String::new()
        };
        let _ = writeln!(
            b,
            "<tr class=\"dir\"><td class=\"name\"><a href=\"{href}\">{name}/</a></td><td class=\"muted\">{files} files{partial}</td>\
             <td class=\"num size\">{size}</td><td colspan=\"3\"></td></tr>",
            href = esc(&replica_link(&d.path)),
            name = esc(&d.name),
            files = d.files,
            size = bytes(d.bytes),
        );
    }
    for f in &l.files {
        b.push_str(&file_row(f));
    }
    if l.total_entries == 0 {
        b.push_str("<tr class=\"empty\"><td colspan=\"6\">Nothing here yet: files appear once a client fetched them through Cistern.</td></tr>\n");
    }
    b.push_str("</tbody></table>\n");
    let shown = l.dirs.len() + l.files.len();
    if l.offset > 0 || l.next_offset.is_some() {
        let _ = write!(
            b,
            "<p class=\"pager\">Entries {}–{} of {}.",
            l.offset + usize::from(shown > 0),
            l.offset + shown,
            l.total_entries
        );
        if l.offset > 0 {
            let prev = l.offset.saturating_sub(l.limit);
            let _ = write!(
                b,
                " <a href=\"{}&amp;offset={prev}&amp;limit={}\">← previous</a>",
                esc(&replica_link(&l.path)),
                l.limit
            );
        }
        if let Some(next) = l.next_offset {
            let _ = write!(
                b,
                " <a href=\"{}&amp;offset={next}&amp;limit={}\">next →</a>",
                esc(&replica_link(&l.path)),
                l.limit
            );
        }
        b.push_str("</p>\n");
    }
    let title = if l.path.is_empty() {
        "Replica".to_owned()
    } else {
        format!("Replica: {}", l.path)
    };
    page(&title, "/replica", &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn sizes_and_ages_read_like_ls_and_top() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(age(59), "59 s");
        assert_eq!(age(600), "10 min");
        assert_eq!(age(3 * 86400), "3 d");
    }

    #[test]
    fn replica_links_encode_queries_and_spaces() {
        assert_eq!(
            replica_link("h:80/a b/c?x=1&y"),
            "/replica?path=h%3A80/a%20b/c%3Fx%3D1%26y"
        );
    }
}
