//! A test guest that calls every ABI function through the SDK and reports
//! what it saw in headers, so the host's tests can check both directions of
//! the boundary. Never embedded in the binary.

use cistern_guest::{
    self as cistern, Error, Level, ReplicaState, Result, Target, Verdict, cache, headers, replica,
    request, response,
};

fn error_name(error: Error) -> &'static str {
    match error {
        Error::NotFound => "not-found",
        Error::OutOfBounds => "out-of-bounds",
        Error::Invalid => "invalid",
        Error::WrongHook => "wrong-hook",
        Error::TooLarge => "too-large",
        Error::UnknownLimiter => "unknown-limiter",
        Error::Other(_) => "other",
    }
}

fn report<T>(name: &str, result: Result<T>, show: impl Fn(T) -> String) -> Result<()> {
    let value = match result {
        Ok(value) => show(value),
        Err(error) => format!("error:{}", error_name(error)),
    };
    request::set_header(name, &value)
}

fn on_request() -> Result<()> {
    let path = request::path()?;
    report("x-method", request::method(), |v| v)?;
    report("x-url", request::url(), |v| v)?;
    report("x-path", Ok(path.clone()), |v| v)?;
    report("x-query", request::query(), |v| {
        v.unwrap_or_else(|| "none".into())
    })?;
    report("x-host", request::host(), |v| v)?;
    report("x-client-addr", request::client_addr(), |v| v)?;
    report("x-client-ip", request::client_ip(), |v| v)?;
    report("x-greeting", cistern::param("greeting"), |v| {
        v.unwrap_or_default()
    })?;
    report("x-multi", cistern::params("multi"), |v| v.join(","))?;
    report("x-missing-param", cistern::param("missing"), |v| {
        format!("{v:?}")
    })?;
    report(
        "x-accept-all",
        headers::all(Target::Request, "accept"),
        |v| v.join("|"),
    )?;
    report("x-names", headers::names(Target::Request), |v| v.join(","))?;
    let probe = cistern::param("probe-key")?.unwrap_or_default();
    report("x-replica", replica::state(&probe), |v| {
        match v {
            ReplicaState::Complete => "complete",
            ReplicaState::Partial => "partial",
            ReplicaState::Absent => "absent",
        }
        .into()
    })?;
    report("x-sha-hit", replica::url_by_sha256(&[0xab; 32]), |v| {
        v.unwrap_or_else(|| "none".into())
    })?;
    report("x-sha-miss", replica::url_by_sha256(&[0x00; 32]), |v| {
        v.unwrap_or_else(|| "none".into())
    })?;
    let ip = request::client_ip()?;
    report(
        "x-limit",
        cistern::limiter_check("tour", &ip),
        |v| match v {
            Verdict::Allow => "allow".into(),
            Verdict::Deny { retry_after } => format!("deny:{retry_after}"),
        },
    )?;
    report(
        "x-limit-unknown",
        cistern::limiter_check("nope", &ip),
        |_| "?".into(),
    )?;
    report("x-status-in-request", response::status(), |s| s.to_string())?;
    report("x-bad-header", request::set_header("bad name", "v"), |_| {
        "?".into()
    })?;
    report("x-bad-url", request::set_url("not a url"), |_| "?".into())?;
    report("x-removed", request::remove_header("x-remove-me"), |n| {
        n.to_string()
    })?;
    headers::add(Target::Request, "x-added", "1")?;
    headers::add(Target::Request, "x-added", "2")?;
    request::set_cache_key(&format!("tour:{path}"))?;
    request::set_upstream_url(&format!("http://upstream.test{path}"))?;
    report("x-key-back", request::cache_key(), |v| {
        v.unwrap_or_default()
    })?;
    report("x-upstream-back", request::upstream_url(), |v| {
        v.unwrap_or_default()
    })?;
    cistern::log(Level::Info, "abi-tour on_request done");
    if request::query()?.is_some_and(|q| q.contains("bypass")) {
        cache::uncacheable()?;
    }
    match path.as_str() {
        "/answer" => {
            response::set_header("x-answer", "yes")?;
            cistern::respond(418, b"short and stout")?;
        }
        "/redirect" => cistern::redirect(307, "http://elsewhere.test/")?,
        "/rewrite" => request::set_url("http://rewritten.test/new?x=1")?,
        "/fail" => return Err(Error::Invalid),
        "/panic" => panic!("abi-tour asked to panic"),
        "/bigbody" => {
            report(
                "x-big-body",
                cistern::respond(200, &vec![b'x'; 1 << 20]),
                |_| "?".into(),
            )?;
        }
        _ => {}
    }
    Ok(())
}

fn on_response() -> Result<()> {
    let status = response::status()?;
    response::set_header("x-status", &status.to_string())?;
    if let Some(method) = request::header("x-method")? {
        response::set_header("x-seen-method", &method)?;
    }
    report_response("x-req-readonly", request::set_header("x-nope", "1"))?;
    report_response("x-respond", cistern::respond(200, b""))?;
    report_response("x-set-url", request::set_url("http://other.test/"))?;
    response::remove_header("x-remove-me")?;
    if let Some(location) = response::header("location")? {
        response::set_header("location", &format!("{location}#tour"))?;
    }
    match request::path()?.as_str() {
        "/ttl" => {
            cache::set_ttl(60)?;
            cache::cap_ttl(30)?;
        }
        "/immutable" => cache::immutable()?,
        "/nostore" => cache::uncacheable()?,
        "/fail" => return Err(Error::Invalid),
        _ => {}
    }
    Ok(())
}

fn report_response(name: &str, result: Result<()>) -> Result<()> {
    let value = match result {
        Ok(()) => "ok".to_owned(),
        Err(error) => format!("error:{}", error_name(error)),
    };
    response::set_header(name, &value)
}

cistern::policy!(on_request => on_request, on_response => on_response);
