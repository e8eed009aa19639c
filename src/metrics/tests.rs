use super::*;

#[test]
fn every_series_exists_at_zero_before_any_event() {
    let m = Metrics::new();
    let _orders = m.source("orders");
    let (text, content_type) = m.render();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    for line in [
        "outboxd_messages_published_total{source=\"orders\"} 0",
        "outboxd_publish_failures_total{reason=\"returned\",source=\"orders\"} 0",
        "outboxd_publish_failures_total{reason=\"nacked\",source=\"orders\"} 0",
        "outboxd_pending_messages{source=\"orders\"} 0",
        "outboxd_source_up{source=\"orders\"} 0",
        "outboxd_relay_lag_seconds_count{source=\"orders\"} 0",
        "outboxd_batch_size_count{source=\"orders\"} 0",
        "outboxd_broker_up 0",
        "outboxd_partitions_owned{source=\"orders\"} 0",
        "outboxd_rebalances_total{source=\"orders\"} 0",
        "outboxd_held_rows{source=\"orders\"} 0",
        "outboxd_held_by_dead_letters{source=\"orders\"} 0",
        "outboxd_oldest_sendable_age_seconds{source=\"orders\"} 0",
        "outboxd_unclaimable_rows{source=\"orders\"} 0",
        "outboxd_source_paused{source=\"orders\"} 0",
        "outboxd_source_errors_total{reason=\"settle\",source=\"orders\"} 0",
        "outboxd_parked_total{reason=\"refused\",source=\"orders\"} 0",
        "outboxd_build_info{version=\"",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn reasons_index_their_series_in_declaration_order() {
    for (i, r) in FailureReason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "{r}");
    }
    for (i, r) in SourceError::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i, "{}", r.as_str());
    }
    let m = Metrics::new();
    let s = m.source("x");
    s.error(SourceError::Settle).inc();
    s.failure(FailureReason::Refused).inc();
    assert!(s.parked(FailureReason::Timeout).is_none());
    let (text, _) = m.render();
    assert!(
        text.contains("outboxd_source_errors_total{reason=\"settle\",source=\"x\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("outboxd_source_errors_total{reason=\"database\",source=\"x\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("outboxd_publish_failures_total{reason=\"refused\",source=\"x\"} 1"),
        "{text}"
    );
}

#[test]
fn counts_land_on_the_right_series() {
    let m = Metrics::new();
    let s = m.source("billing");
    s.failure(FailureReason::Timeout).inc();
    s.published.inc_by(3);
    let (text, _) = m.render();
    assert!(
        text.contains("outboxd_publish_failures_total{reason=\"timeout\",source=\"billing\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("outboxd_messages_published_total{source=\"billing\"} 3"),
        "{text}"
    );
}
