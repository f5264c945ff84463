#!/usr/bin/env bash
# `make run`'s foreground part: the platform is up (make up); feed sample events, show where to look,
# and stop what `make up` started on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

stop() {
  echo
  echo "stopping the services and the Kafka broker…"
  make -s down
  exit 0
}
trap stop INT TERM

key=$($BIN/loyalty keys create --tenant demo --scope admin --name "make run demo" 2>/dev/null)
# A small programme (points per euro, first-purchase and up-sell bonuses, tiers), so the sample purchases
# earn points that reach the ledger; activated from the past, so every sample event falls under it.
version=$(curl -s -X POST -H "X-API-Key: $key" -H 'Content-Type: application/json' \
  --data @scripts/demo-ruleset.json http://127.0.0.1:8002/v1/rulesets/demo/versions \
  | $BIN/python -c 'import json, sys; print(json.load(sys.stdin)["version"])')
curl -s -o /dev/null -X POST -H "X-API-Key: $key" -H 'Content-Type: application/json' \
  --data '{"effective_from": "2000-01-01T00:00:00Z"}' \
  "http://127.0.0.1:8002/v1/rulesets/demo/versions/$version/activate"
$BIN/loyalty sample --tenant demo --count 25 --customers 5
sleep 3
echo
echo "The platform is up:"
for pair in ledger:8001 rules:8002 metrics:8003; do
  svc=${pair%%:*}; port=${pair##*:}
  printf "  %-8s http://127.0.0.1:%s/docs   (ready: /readyz, Prometheus: /metrics, log: .local/run/%s.log)\n" "$svc" "$port" "$svc"
done
echo
echo "A demo API key for tenant 'demo' (scope admin): $key"
echo
echo "What the sample stream did (rules ruleset 'demo' v$version awarded points, the ledger booked them,"
echo "metrics aggregated revenue):"
curl -s -H "X-API-Key: $key" http://127.0.0.1:8002/v1/customers/cust-001/state; echo
curl -s -H "X-API-Key: $key" http://127.0.0.1:8001/v1/accounts/cust-001; echo
today=$(date -u +%F)
curl -s -H "X-API-Key: $key" "http://127.0.0.1:8003/v1/kpis/daily-purchases?from=$today&to=$today"; echo
echo
echo "Try:  curl -H 'X-API-Key: $key' http://127.0.0.1:8002/v1/customers/cust-002/awards"
echo "      curl -H 'X-API-Key: $key' http://127.0.0.1:8001/v1/accounts/cust-002/entries"
echo "      .venv/bin/loyalty sample --tenant demo --count 100     # more events"
echo "      .venv/bin/loyalty dlq                                   # dead letters and their reasons"
echo
echo "Running in the foreground; Ctrl-C stops the services and Kafka."
while true; do sleep 3600 & wait $!; done
