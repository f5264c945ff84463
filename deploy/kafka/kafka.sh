#!/usr/bin/env bash
# Runs a real Apache Kafka broker (KRaft combined mode) from the jars Maven resolves; no Docker.
#   kafka.sh jars | up | down | status
# Environment: KAFKA_HOME_DIR (default .local/kafka: data, logs, pid), KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093),
# KAFKA_LIBS_DIR (default $KAFKA_HOME_DIR/libs; a second broker, like make chaos's, reuses the resolved jars)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
home=${KAFKA_HOME_DIR:-$root/.local/kafka}
port=${KAFKA_PORT:-9092}
cport=${KAFKA_CONTROLLER_PORT:-9093}
libs=${KAFKA_LIBS_DIR:-$home/libs}
pidfile=$home/kafka.pid
logdir=$home/logs
props=$home/server.properties

log() { printf 'kafka: %s\n' "$*" >&2; }

jars() {
  if [ -f "$libs/.complete" ]; then return 0; fi
  log "resolving the broker classpath from Maven Central (deploy/kafka/pom.xml)"
  mkdir -p "$libs"
  mvn -B -q -f "$here/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs"
  ls "$libs"/kafka_2.13-*.jar >/dev/null
  touch "$libs/.complete"
}

running() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

answers() {
  # A metadata request through the bundled admin tool: proves the broker serves clients, not just that the port is open.
  java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2-tools.yaml" \
    org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$port" >/dev/null 2>&1 && return 0
  "${PYTHON:-$root/.venv/bin/python}" - "$port" <<'PY' 2>/dev/null
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient
async def main() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{sys.argv[1]}", request_timeout_ms=3000)
    await admin.start()
    try:
        await admin.describe_cluster()
    finally:
        await admin.close()
asyncio.run(main())
PY
}

up() {
  jars
  mkdir -p "$home/data" "$logdir"
  if running; then
    log "already running (pid $(cat "$pidfile")), reusing it"
  else
    sed -e "s#@PORT@#$port#g" -e "s#@CONTROLLER_PORT@#$cport#g" -e "s#@DATA_DIR@#$home#g" \
      "$here/server.properties.template" > "$props"
    if [ ! -f "$home/data/meta.properties" ]; then
      cluster_id=$(java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
      log "formatting storage with cluster id $cluster_id"
      java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2-tools.yaml" \
        kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$props" -g >/dev/null
    fi
    log "starting the broker on 127.0.0.1:$port (logs in $logdir)"
    KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms512m -Xmx1g}
    # setsid: the broker outlives the make process that started it and is stopped by its pid.
    setsid nohup java $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true \
      -Dkafka.logs.dir="$logdir" -Dlog4j2.configurationFile="$here/log4j2.yaml" \
      -cp "$libs/*" kafka.Kafka "$props" >"$logdir/stdout.log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
  fi
  for _ in $(seq 1 120); do
    if answers; then
      log "broker answers on 127.0.0.1:$port ($(grep -o 'Kafka version: [^ ]*' "$logdir/server.log" 2>/dev/null | tail -n 1))"
      return 0
    fi
    if ! running; then
      log "the broker exited; last lines of its log:"; tail -n 30 "$logdir/server.log" "$logdir/stdout.log" >&2 || true
      return 1
    fi
    sleep 1
  done
  log "the broker did not answer within 120 s"; return 1
}

down() {
  if running; then
    pid=$(cat "$pidfile")
    log "stopping the broker (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && { log "still running after 60 s, killing it"; kill -9 "$pid"; }
  else
    log "not running"
  fi
  rm -f "$pidfile"
}

status() {
  if running && answers; then echo "kafka: up (pid $(cat "$pidfile"))"; else echo "kafka: down"; return 1; fi
}

case "${1:-}" in
  jars) jars ;;
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 jars|up|down|status" >&2; exit 2 ;;
esac
