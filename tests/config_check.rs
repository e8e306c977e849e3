//! `cistern check FILE` validates a config like `nginx -t`, and a broken
//! config never starts the proxy.

use std::process::Command;

fn cistern(args: &[&str], dir: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_shipped_config_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (code, text) = cistern(&["check", "config.kdl"], &root);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok"), "{text}");
}

#[test]
fn a_broken_config_is_reported_with_line_and_column_and_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.kdl"),
        "listen \"127.0.0.1:8080\"\nstore {\n    root \"r\"\n    max-size \"lots\"\n}\nmirorr \"typo\" {\n}\n",
    )
    .unwrap();
    let (code, text) = cistern(&["check", "bad.kdl"], dir.path());
    assert_ne!(code, 0);
    assert!(text.contains("bad.kdl"), "names the file: {text}");
    assert!(text.contains("max-size"), "{text}");
    assert!(text.contains("mirorr"), "{text}");
    assert!(
        text.contains(":4:") || text.contains("4:"),
        "line of the bad size: {text}"
    );

    // Starting with it fails before binding anything.
    let (code, text) = cistern(&["--config", "bad.kdl"], dir.path());
    assert_ne!(code, 0, "{text}");

    let (code, text) = cistern(&["check", "missing.kdl"], dir.path());
    assert_ne!(code, 0);
    assert!(text.contains("missing.kdl"), "{text}");
}

#[test]
fn a_config_nested_thousands_deep_is_reported_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // Closed and unclosed blocks, each deeper than a parser's stack would
    // hold one frame per level: an error each, never an abort. (Fewer
    // unclosed: the parser's time grows with their square.)
    let closed = format!("a {}{}\n", "{ a ".repeat(3000), "}".repeat(3000));
    let unclosed = "a {".repeat(1500);
    for (name, text) in [("closed.kdl", closed), ("unclosed.kdl", unclosed)] {
        std::fs::write(dir.path().join(name), text).unwrap();
        let (code, text) = cistern(&["check", name], dir.path());
        assert_eq!(code, 1, "{name}: a reported error, not a crash: {text}");
        assert!(text.contains(name), "{name}: names the file: {text}");
    }

    // A file of braces beyond any config is refused by their count, with
    // the place of the first one too many.
    let braces = format!("listen \"127.0.0.1:8080\"\nx \"{}\"\n", "{".repeat(5_000));
    std::fs::write(dir.path().join("braces.kdl"), braces).unwrap();
    let (code, text) = cistern(&["check", "braces.kdl"], dir.path());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("more than 4096 `{`"), "{text}");
    assert!(text.contains("braces.kdl:2:"), "points at line 2: {text}");
}
