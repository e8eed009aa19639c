//! Secrets: from files or inline, never both, never printed.

use super::*;

#[test]
fn secrets_can_come_from_files_but_not_from_both() {
    let dir = std::env::temp_dir().join(format!("outboxd-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("db_url");
    std::fs::write(&file, "postgres://root:pw@127.0.0.1/orders\n").unwrap();
    let text = MINIMAL.replace(
        "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
        &format!("database_url_file = {:?}", file.display().to_string()),
    );
    let c = load(&text).unwrap();
    // the trailing newline of the mounted file is not part of the value
    assert_eq!(
        c.sources[0].database_url.expose(),
        "postgres://root:pw@127.0.0.1/orders"
    );
    let both = text.replace(
        "name = \"orders\"",
        "name = \"orders\"\ndatabase_url = \"postgres://x@y/z\"",
    );
    assert!(err(&both).contains("not both"), "{}", err(&both));
    let missing = MINIMAL.replace(
        "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
        "database_url_file = \"/nonexistent/x\"",
    );
    assert!(
        err(&missing).contains("database_url_file"),
        "{}",
        err(&missing)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_are_not_in_debug_output() {
    let text = MINIMAL
        .replace("guest:guest", "guest:hunter2")
        .replace("root@", "root:hunter3@");
    let c = load(&text).unwrap();
    let debug = format!("{:?}", c.rabbitmq) + &format!("{:?}", c.sources[0].database_url);
    assert!(
        !debug.contains("hunter2") && !debug.contains("hunter3"),
        "{debug}"
    );
}

#[test]
fn secret_files_must_hold_a_little_utf8_text() {
    let dir = std::env::temp_dir().join(format!("outboxd-secret-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let cases = [
        // empty: used to be "names no host"
        (file("empty", b""), "is empty"),
        // only the newline a mounted secret ends in
        (file("newline", b"\n"), "is empty"),
        // not text
        (
            file("binary", b"postgres://root:\xff\xfe@h/d"),
            "is not UTF-8 text",
        ),
        // a megabyte: more than any URL
        (file("huge", &vec![b'a'; 1 << 20]), "more than 64 KiB"),
        // endless: read only up to the cap, not until memory runs out
        ("/dev/zero".to_owned(), "more than 64 KiB"),
    ];
    for (path, needle) in cases {
        let text = MINIMAL.replace(
            "database_url = \"postgres://root@127.0.0.1:5432/orders\"",
            &format!("database_url_file = {path:?}"),
        );
        let msg = err(&text);
        assert!(
            msg.contains("source[0].database_url_file") && msg.contains(needle),
            "{path}: {needle:?} not in {msg:?}"
        );
        assert!(!msg.contains("root:"), "{path}: content leaked in {msg:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
