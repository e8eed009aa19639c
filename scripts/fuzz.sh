#!/usr/bin/env bash
# Runs the property tests (config loader, ${VAR} interpolation, routing-key
# template, row mapping) over and over with fresh random seeds for
# DURATION seconds (default 600) and prints how many inputs were tried.
# cargo-fuzz needs a nightly toolchain; proptest runs on stable and its
# failures are saved in proptest-regressions/ and replayed by the normal
# suite.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${DURATION:-600}
cases=${PROPTEST_CASES:-5000}
bin=$(cargo test --locked --lib --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
tests=$("$bin" properties --list 2>/dev/null | grep -c ': test$')
end=$(( $(date +%s) + duration ))
rounds=0
while [ "$(date +%s)" -lt "$end" ]; do
    PROPTEST_CASES=$cases "$bin" properties --quiet >/tmp/outboxd-fuzz.log 2>&1 || {
        cat /tmp/outboxd-fuzz.log
        echo "fuzz: a property failed after $rounds rounds; see proptest-regressions/" >&2
        exit 1
    }
    rounds=$((rounds + 1))
    echo "fuzz: round $rounds done ($((rounds * cases)) inputs per property so far)"
done
echo "fuzz: $tests properties x $((rounds * cases)) inputs = $((tests * rounds * cases)) inputs in ${duration}s, no failure"
