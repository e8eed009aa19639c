//! `rabbitmq.url` as one URL or a list, `rabbitmq.urls`, and what is
//! refused about a list of broker nodes.

use super::*;

const A: &str = "amqp://guest:hunter2@10.0.0.1:5672/%2f";
const B: &str = "amqp://guest:hunter2@10.0.0.2:5672/%2f";
const S: &str = "amqps://guest:hunter2@10.0.0.3/%2f";

/// `MINIMAL` with its `url = …` line replaced by `lines`.
fn rabbit(lines: &str) -> String {
    MINIMAL.replace("url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"", lines)
}

/// Each node's display form (no password), in config order.
fn node_displays(c: &Config) -> Vec<&str> {
    c.rabbitmq
        .nodes
        .iter()
        .map(|n| n.display.as_str())
        .collect()
}

/// The nodes' displays, or pieces of the error.
type Want = Result<&'static [&'static str], &'static [&'static str]>;

#[test]
fn node_lists_are_read_from_url_or_urls_and_mistakes_name_their_key() {
    let cases: [(String, Want); 11] = [
        // the single form keeps working
        (format!("url = {A:?}"), Ok(&["10.0.0.1:5672// as guest"])),
        // a list under `urls`, in config order
        (
            format!("urls = [{B:?}, {A:?}]"),
            Ok(&["10.0.0.2:5672// as guest", "10.0.0.1:5672// as guest"]),
        ),
        // a list under `url`
        (
            format!("url = [{A:?}, {B:?}]"),
            Ok(&["10.0.0.1:5672// as guest", "10.0.0.2:5672// as guest"]),
        ),
        // a list of one is a single node
        (format!("urls = [{A:?}]"), Ok(&["10.0.0.1:5672// as guest"])),
        // both keys: the error names both
        (
            format!("url = {A:?}\nurls = [{B:?}]"),
            Err(&[
                "rabbitmq.urls",
                "rabbitmq.url and rabbitmq.urls are both set",
            ]),
        ),
        // an empty list has no node to connect to
        (
            "urls = []".to_owned(),
            Err(&["rabbitmq.urls", "empty list"]),
        ),
        // a bad URL is named by its index, without its password
        (
            format!("urls = [{A:?}, \"amqp://guest:hunter2@h/v@x\"]"),
            Err(&["rabbitmq.urls[1]", "more than one `@`"]),
        ),
        // an empty element
        (
            format!("url = [{A:?}, \"\"]"),
            Err(&["rabbitmq.url[1]", "is empty"]),
        ),
        // the same node twice
        (
            format!("urls = [{A:?}, {B:?}, {A:?}]"),
            Err(&["rabbitmq.urls[2]", "same node as rabbitmq.urls[0]"]),
        ),
        // amqp:// and amqps:// mixed: the TLS settings could not apply to both
        (
            format!("urls = [{S:?}, {A:?}]"),
            Err(&[
                "rabbitmq.urls[1]",
                "is amqp:// but rabbitmq.urls[0] is amqps://",
            ]),
        ),
        // neither a string nor a list of strings
        (
            "url = 5".to_owned(),
            Err(&["rabbitmq.url", "a URL string or a list"]),
        ),
    ];
    for (lines, want) in cases {
        let text = rabbit(&lines);
        match (load(&text), want) {
            (Ok(c), Ok(displays)) => {
                assert_eq!(node_displays(&c), displays, "{lines}");
                assert_eq!(c.rabbitmq.display, displays.join(", "), "{lines}");
            }
            (Err(e), Err(needles)) => {
                let msg = e.to_string();
                for needle in needles {
                    assert!(msg.contains(needle), "{lines}: {needle:?} not in {msg:?}");
                }
                assert!(!msg.contains("hunter2"), "{lines}: {msg}");
            }
            (got, want) => panic!("{lines}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn every_node_gets_the_tls_settings_and_a_variable_in_each() {
    let text = rabbit(
        "urls = [\"amqps://guest:${PW}@10.0.0.3/%2f\", \"amqps://guest:${PW}@10.0.0.4:5671/%2f\"]\n\
         tls_insecure_skip_verify = true",
    );
    let env = |v: &str| (v == "PW").then(|| "hunter2".to_owned());
    let c = Config::from_toml(&text, &env).unwrap();
    assert_eq!(c.rabbitmq.nodes.len(), 2);
    assert_eq!(
        c.rabbitmq.nodes[1].url.expose(),
        "amqps://guest:hunter2@10.0.0.4:5671/%2f"
    );
    assert!(c.rabbitmq.tls.is_some());
    let node = c.rabbitmq.describe_node(1);
    assert!(node.starts_with("10.0.0.4:5671// as guest (TLS"), "{node}");
    assert!(!format!("{:?}", c.rabbitmq).contains("hunter2"));
}

#[test]
fn a_url_file_may_hold_one_node_url_a_line() {
    let dir = std::env::temp_dir().join(format!("outboxd-nodes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("urls");
    std::fs::write(&file, format!("{A}\n\n{B}\n")).unwrap();
    let with_file = |extra: &str| {
        rabbit(&format!(
            "url_file = {:?}{extra}",
            file.display().to_string()
        ))
    };
    let c = load(&with_file("")).unwrap();
    assert_eq!(
        node_displays(&c),
        ["10.0.0.1:5672// as guest", "10.0.0.2:5672// as guest"]
    );
    // a bad line is named by its line number
    std::fs::write(&file, format!("{A}\namqp://guest:hunter2@h/v@x\n")).unwrap();
    let msg = err(&with_file(""));
    assert!(msg.contains("rabbitmq.url_file (line 2)"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    // url_file and urls together
    let msg = err(&with_file(&format!("\nurls = [{A:?}]")));
    assert!(
        msg.contains("rabbitmq.url_file and rabbitmq.urls are both set"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
