#!/usr/bin/env bash
# Writes deploy/kubernetes/prometheusrule.yaml, the alert rules as a
# PrometheusRule for the Prometheus Operator: deploy/prometheus/alerts.yaml
# verbatim under `spec:` (every non-empty line indented by two spaces), so
# the two cannot drift apart.
#   scripts/prometheusrule.sh           rewrite the file
#   scripts/prometheusrule.sh --check   fail, with the difference, if it is out of date
set -euo pipefail
cd "$(dirname "$0")/.."
rules=deploy/prometheus/alerts.yaml
out=deploy/kubernetes/prometheusrule.yaml

render() {
  cat <<'HEADER'
# Written by scripts/prometheusrule.sh from deploy/prometheus/alerts.yaml:
# edit that file and run the script (the test suite checks they agree).
#
# kubectl apply -n monitoring -f deploy/kubernetes/prometheusrule.yaml
# Prometheus loads it if its ruleSelector matches these labels (with
# kube-prometheus-stack, add `release: <its Helm release name>`).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: outboxd
  labels:
    app.kubernetes.io/name: outboxd
    app.kubernetes.io/component: alerting-rules
spec:
HEADER
  sed -e 's/^./  &/' "$rules"
}

case "${1:-}" in
  --check)
    if ! diff -u "$out" <(render); then
      echo "prometheusrule: $out is out of date with $rules; run scripts/prometheusrule.sh" >&2
      exit 1
    fi
    echo "prometheusrule: $out matches $rules" >&2
    ;;
  "")
    render >"$out"
    echo "prometheusrule: wrote $out" >&2
    ;;
  *)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac
