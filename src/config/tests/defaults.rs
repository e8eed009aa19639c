//! The documented defaults, the bundled example, `${VAR}` substitution.

use super::*;

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.metrics.listen.to_string(), DEFAULT_METRICS_LISTEN);
    assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.rabbitmq.display, "127.0.0.1:5672// as guest");
    let s = &c.sources[0];
    assert_eq!(s.table.to_string(), "public.outbox");
    assert_eq!(s.exchange, "");
    assert_eq!(s.routing_key.to_string(), source::DEFAULT_ROUTING_KEY);
    assert_eq!(s.batch_size, 4000);
    assert_eq!(s.poll_interval, Duration::from_secs(1));
    assert_eq!(s.after_publish, AfterPublish::Delete);
    assert_eq!(s.max_in_flight, 2);
    assert_eq!(s.ordering, Ordering::Aggregate);
    assert_eq!(s.on_park, OnPark::Hold);
    assert_eq!(s.pool_size, 3);
    assert_eq!(s.notify_channel, "outboxd.public.outbox");
    assert_eq!(s.database_display, "127.0.0.1:5432/orders as root");
}

#[test]
fn the_bundled_example_config_is_valid() {
    let text = include_str!("../../../config/outboxd.toml");
    let c = load(text).unwrap();
    assert!(!c.sources.is_empty());
}

#[test]
fn variables_are_substituted_in_every_string() {
    let text = r#"
[rabbitmq]
url = "amqp://guest:${PW}@127.0.0.1:5672/%2f"
[[source]]
name = "${NAME}"
database_url = "postgres://root@127.0.0.1/orders"
poll_interval = "${POLL}"
after_publish = "${MODE}"
"#;
    let env = |v: &str| match v {
        "PW" => Some("s3cr\"et".to_owned()),
        "NAME" => Some("orders".to_owned()),
        "POLL" => Some("250ms".to_owned()),
        "MODE" => Some("mark".to_owned()),
        _ => None,
    };
    let c = Config::from_toml(text, &env).unwrap();
    assert_eq!(
        c.rabbitmq.nodes[0].url.expose(),
        "amqp://guest:s3cr\"et@127.0.0.1:5672/%2f"
    );
    assert_eq!(c.sources[0].name, "orders");
    assert_eq!(c.sources[0].poll_interval, Duration::from_millis(250));
    assert_eq!(c.sources[0].after_publish, AfterPublish::Mark);
}
